"""Cross-checks: the problems of a parsed config that no single field shows (unknown sources,
cycles between calls, templates naming nothing, timeouts past the deadline...), each located."""

from __future__ import annotations

import re
from collections.abc import Mapping

from gateway.config import results
from gateway.config.calls import SQL_STAR, STAR
from gateway.config.fieldpath import Loc, part
from gateway.config.kinds import SourceConfig, kind_of
from gateway.config.schema import CallConfig, EndpointCache, EndpointConfig, GatewayConfig
from gateway.core import templates

RESERVED_PATHS = frozenset(
    {"/admin", "/metrics", "/healthz", "/readyz", "/docs", "/redoc", "/openapi.json"}
)
"""First path segments the gateway serves itself; an endpoint there would be shadowed or shadow."""


def cross_check(config: GatewayConfig) -> list[tuple[Loc, str]]:
    """Return every problem that single fields cannot show: names, cycles, templates, budgets."""
    found: list[tuple[Loc, str]] = _check_hedges(config)
    for name in config.sources:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
            found.append((("sources", name), "a source name is letters, digits, _ and -"))
    seen_paths: dict[str, int] = {}
    for i, ep in enumerate(config.endpoints):
        at: Loc = ("endpoints", i)
        shape = templates.starlette_path(ep.path)
        shape = re.sub(r"\{[^}]*\}", "{}", shape)
        if shape in seen_paths:
            found.append(((*at, "path"), f"duplicate path: same as endpoints.{seen_paths[shape]}"))
        seen_paths.setdefault(shape, i)
        first = "/" + ep.path.split("/")[1] if ep.path != "/" else "/"
        if first in RESERVED_PATHS:
            found.append(
                (
                    (*at, "path"),
                    f"{first} belongs to the gateway itself (reserved: "
                    f"{', '.join(sorted(RESERVED_PATHS))})",
                )
            )
        params = {name for name, _ in templates.path_params(ep.path)}
        if not ep.calls and ep.listing is None:
            found.append(((*at, "calls"), "an endpoint needs at least one call (or list:)"))
        deps: dict[str, set[str]] = {}
        for name, call in ep.calls.items():
            cat: Loc = (*at, "calls", name)
            deps[name] = set()
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
                found.append((cat, f"call name {name!r} must be an identifier not starting with _"))
            source = config.sources.get(call.source)
            if source is None:
                known = ", ".join(part(n) for n in sorted(config.sources)) or "none"
                found.append(((*cat, "source"), f"unknown source {call.source!r} (known: {known})"))
            for field, texts in _call_templates(call):
                for text in texts:
                    for ref in templates.parse(text).refs:
                        if ref.root in params and not ref.attrs:
                            continue
                        if ref.root in ep.calls and ref.root != name:
                            deps[name].add(ref.root)
                            continue
                        found.append(
                            (
                                (*cat, field),
                                f"template {{{ref.text}}} names no path parameter or call"
                                f" (parameters: {', '.join(sorted(params)) or 'none'})",
                            )
                        )
            if source is not None:
                found += kind_of(source).check_call(cat, call, params)
            found += _check_stars(cat, call)
            if call.batch is not None:
                found += _check_batch(cat, call, source, params, deps[name], ep.deadline_ms)
            found += _check_forwarding(cat, call, source, ep.cache)
            found += _check_schema(cat, call)
            if call.required and call.has_fallback:
                found.append(((*cat, "fallback"), "a required call cannot have a fallback"))
            timeout = call.timeout_ms or (source.timeout_ms if source else 0)
            if timeout > ep.deadline_ms:
                where = "timeout_ms" if call.timeout_ms else "source"
                found.append(
                    (
                        (*cat, where),
                        f"timeout {timeout} ms is longer than the endpoint's "
                        f"deadline_ms {ep.deadline_ms}",
                    )
                )
        cycle = _cycle(deps)
        if cycle:
            found.append(
                (
                    (*at, "calls", cycle[0]),
                    "calls wait for each other in a cycle: " + " -> ".join(cycle),
                )
            )
        if ep.listing is not None:
            found += _check_listing(at, ep, config.endpoints, deps)
        if ep.shape is not None:
            found += _check_shape(at, ep)
        if ep.cache:
            for j, tag in enumerate(ep.cache.tags):
                for ref in templates.parse(tag).refs:
                    if ref.root not in params or ref.attrs:
                        found.append(
                            (
                                (*at, "cache", "tags", j),
                                f"tag template {{{ref.text}}} names no path parameter",
                            )
                        )
            if ep.cache.partial_ttl_s > ep.cache.ttl_s:
                found.append(((*at, "cache", "partial_ttl_s"), "is longer than ttl_s"))
    return found


def _check_schema(cat: Loc, call: CallConfig) -> list[tuple[Loc, str]]:
    """A declared schema is a valid JSON Schema, and a fallback value is a value it allows."""
    if call.schema_ is None:
        if call.validate_ and call.schema_file is None:
            return [((*cat, "validate"), "validate needs a schema (schema or schema_file)")]
        return []
    where: Loc = (*cat, "schema_file" if call.schema_file is not None else "schema")
    try:
        results.compile_schema(call.schema_)
        narrowed = results.compile_schema(results.narrowed(call) or {})
    except ValueError as exc:
        return [(where, f"not a valid JSON Schema: {_first_line(exc)}")]
    if call.has_fallback and not call.omit and call.fallback is not None:
        for err in narrowed.iter_errors(call.fallback):
            at = "".join(f"[{p!r}]" for p in err.instance_path) or "its value"
            return [((*cat, "fallback"), f"breaks the call's schema at {at}: {err.message}")]
    return []


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [""])[0]


def _check_stars(cat: Loc, call: CallConfig) -> list[tuple[Loc, str]]:
    """`{id*}` and `%(id*)s` mean a batch's ids: outside a `batch:` block they would be sent as
    they are."""
    found: list[tuple[Loc, str]] = []
    texts = _call_templates(call)
    if isinstance(call.query, str):
        texts.append(("query", [call.query]))
    for field, values in texts:
        for text in values:
            star = STAR.search(text) or SQL_STAR.search(text)
            if star:
                found.append(
                    ((*cat, field), f"{star.group(0)} is the ids of a batch: only in a batch block")
                )
                break
    return found


def _check_batch(
    cat: Loc,
    call: CallConfig,
    source: SourceConfig | None,
    params: set[str],
    deps: set[str],
    deadline_ms: int,
) -> list[tuple[Loc, str]]:
    assert call.batch is not None
    at: Loc = (*cat, "batch")
    if len(params) != 1:
        return [(at, "only an item endpoint (one path parameter, its id) can batch its calls")]
    if deps:
        return [
            (
                at,
                f"a call that waits for another ({', '.join(sorted(deps))}) cannot be batched: "
                "it runs per item, as soon as its item's values are known",
            )
        ]
    if source is None:
        return []
    found = kind_of(source).check_batch(at, call.batch, next(iter(params)))
    timeout = call.batch.timeout_ms
    if timeout is not None and timeout > deadline_ms:
        found.append(
            (
                (*at, "timeout_ms"),
                f"timeout {timeout} ms is longer than the endpoint's deadline_ms {deadline_ms}",
            )
        )
    return found


def _check_listing(
    at: Loc, ep: EndpointConfig, endpoints: list[EndpointConfig], deps: Mapping[str, set[str]]
) -> list[tuple[Loc, str]]:
    """A listing names an item endpoint with one parameter, and finds its ids in one place."""
    assert ep.listing is not None
    found: list[tuple[Loc, str]] = []
    where: Loc = (*at, "list")
    items = [e for e in endpoints if e.path == ep.listing.item]
    if not items:
        known = ", ".join(e.path for e in endpoints if e.listing is None) or "none"
        found.append(
            ((*where, "item"), f"unknown item endpoint {ep.listing.item!r} (endpoints: {known})")
        )
    elif items[0].listing is not None:
        found.append(((*where, "item"), "an item endpoint cannot itself be a listing"))
    else:
        item_params = templates.path_params(items[0].path)
        if len(item_params) != 1:
            found.append(
                (
                    (*where, "item"),
                    f"an item endpoint takes exactly one path parameter, its id "
                    f"({items[0].path} has {len(item_params)})",
                )
            )
    if ep.cache is not None:
        found.append(
            (
                (*at, "cache"),
                "a listing is cached per item, under its item endpoint's cache: remove cache here",
            )
        )
    ids = ep.listing.ids
    if ids.call is not None:
        if ids.call not in ep.calls:
            known = ", ".join(ep.calls) or "none"
            found.append(
                (
                    (*where, "ids", "call"),
                    f"unknown call {ids.call!r} (this listing's calls: {known})",
                )
            )
        else:
            needed = _waited_for(ids.call, deps)
            for name in ep.calls:
                if name not in needed:
                    found.append(
                        (
                            (*at, "calls", name),
                            f"a listing's calls find its ids: {name} is not {ids.call} "
                            "and not waited for by it",
                        )
                    )
    elif ep.calls:
        name = next(iter(ep.calls))
        found.append(
            (
                (*at, "calls", name),
                "a listing whose ids come from the query has no calls of its own",
            )
        )
    return found


def _check_shape(at: Loc, ep: EndpointConfig) -> list[tuple[Loc, str]]:
    """Each shaped field reads a call of this endpoint, and a field its `select` keeps."""
    assert ep.shape is not None
    if ep.listing is not None:
        return [((*at, "shape"), "a listing's items take their item endpoint's shape")]
    found: list[tuple[Loc, str]] = []
    for name, spec in ep.shape.items():
        where: Loc = (*at, "shape", name)
        if name == "_meta" or not name:
            found.append((where, "_meta is the gateway's own field"))
            continue
        path = spec if isinstance(spec, str) else spec.from_
        if not isinstance(spec, str):
            where = (*where, "from")
        segments = path.split(".")
        if not all(segments):
            found.append((where, f"{path!r} is a dotted path (product.name, reviews.items.0.text)"))
            continue
        root, steps = results.shape_path(path)
        call = ep.calls.get(root)
        if call is None:
            known = ", ".join(ep.calls) or "none"
            found.append((where, f"{root!r} names no call of this endpoint (calls: {known})"))
        elif call.select is not None and steps and isinstance(steps[0], str):
            if steps[0] not in call.select:
                found.append(
                    (
                        where,
                        f"{root} keeps only {', '.join(call.select)} (its select): "
                        f"it has no field {steps[0]!r}",
                    )
                )
    return found


def _waited_for(name: str, deps: Mapping[str, set[str]]) -> set[str]:
    seen = {name}
    todo = [name]
    while todo:
        for d in deps.get(todo.pop(), ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def _check_hedges(config: GatewayConfig) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    for name, source in config.sources.items():
        hedge = source.hedge
        if hedge is not None and hedge.after_ms is not None and hedge.after_ms >= source.timeout_ms:
            found.append(
                (
                    ("sources", name, "hedge", "after_ms"),
                    f"{hedge.after_ms} ms is not shorter than timeout_ms ({source.timeout_ms}): "
                    "the first request times out before a hedge would be sent",
                )
            )
    return found


def _check_forwarding(
    cat: Loc, call: CallConfig, source: SourceConfig | None, cache: EndpointCache | None
) -> list[tuple[Loc, str]]:
    """A forwarded request header shapes the answer: a cached endpoint must vary by it."""
    if not call.forward_headers:
        return []
    if source is not None and not kind_of(source).forwards_headers:
        return [((*cat, "forward_headers"), "only http calls forward request headers")]
    varied = {h.lower() for h in (cache.vary if cache else ())}
    missing = [h for h in call.forward_headers if cache is not None and h.lower() not in varied]
    if missing:
        return [
            (
                (*cat, "forward_headers"),
                f"forwards {', '.join(missing)} but the endpoint's "
                "cache key does not include it: add it to cache.vary (or the answer for one "
                "client would be served to another)",
            )
        ]
    return []


def _call_templates(call: CallConfig) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    if call.path:
        out.append(("path", [call.path]))
    if isinstance(call.query, dict):
        out.append(("query", list(call.query.values())))
    if call.args:
        out.append(("args", list(call.args.values())))
    return out


def _cycle(deps: Mapping[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for d in sorted(deps.get(n, ())):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return []

    for n in deps:
        if n not in state and (found := visit(n)):
            return found
    return []
