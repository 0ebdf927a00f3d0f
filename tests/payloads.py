"""Values crafted to escape a URL template: each must stay one path segment or one query value
(tests/test_templates.py renders them, tests/test_http_source.py sends them to a real server)."""

HOSTILE = [
    "../",
    "..",
    ".",
    "%2F",
    "%2e%2e",
    "a/b",
    "?x=1",
    "#frag",
    "//evil.example",
    "http://evil.example/",
    "@evil",
    "a\r\nX-Injected: 1",
    "a&b=c",
    "caf\u00e9",
    "é ü+",
    " ",
]
