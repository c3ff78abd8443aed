"""relay/upstream/ uses aiosmtplib through its public API only, and imports no layer above it.

Read from the source (ast), so that a private member creeping back in, or a member an
aiosmtplib release removes, fails here by name rather than in production.
"""

from __future__ import annotations

import ast
from pathlib import Path

import aiosmtplib

UPSTREAM = Path(__file__).resolve().parents[2] / "relay" / "upstream"
ABOVE = ("relay.listener", "relay.delivery", "relay.admin", "relay.app", "relay.cli")


def modules() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(), str(p)) for p in sorted(UPSTREAM.glob("*.py"))}


def smtp_modules() -> dict[str, ast.Module]:
    """The modules that use aiosmtplib (pop3.py has a `client` of its own)."""
    return {name: tree for name, tree in modules().items()
            if any(isinstance(n, ast.Import | ast.ImportFrom) and "aiosmtplib" in ast.unparse(n)
                   for n in ast.walk(tree))}


def _client_expression(node: ast.expr) -> bool:
    """`client`, `self.client` or `x._client`: an aiosmtplib.SMTP in these modules."""
    return ((isinstance(node, ast.Name) and node.id in ("client", "_client"))
            or (isinstance(node, ast.Attribute) and node.attr in ("client", "_client")))


def test_upstream_imports_only_aiosmtplib_top_level_public_names() -> None:
    found = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiosmtplib"):
                found += [f"{name}: from {node.module} import {a.name}" for a in node.names
                          if node.module != "aiosmtplib" or a.name not in aiosmtplib.__all__]
            elif isinstance(node, ast.Import):
                found += [f"{name}: import {a.name}" for a in node.names
                          if a.name.startswith("aiosmtplib.")]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id == "aiosmtplib" and node.attr not in aiosmtplib.__all__):
                found.append(f"{name}: aiosmtplib.{node.attr}")
    assert found == [], "not in aiosmtplib's public API (aiosmtplib.__all__)"


def test_every_member_of_the_smtp_client_used_is_public_and_exists() -> None:
    """Each `client.X` in relay/upstream/ is a public member of aiosmtplib.SMTP."""
    smtp = aiosmtplib.SMTP()
    used: dict[str, str] = {}
    for name, tree in smtp_modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _client_expression(node.value):
                used.setdefault(node.attr, name)
    assert used, "the test no longer sees the client: update it"
    private = {m: where for m, where in used.items() if m.startswith("_")}
    missing = {m: where for m, where in used.items() if not hasattr(smtp, m)}
    assert private == {} and missing == {}, (
        f"private members of aiosmtplib.SMTP used: {private}; members aiosmtplib "
        f"{aiosmtplib.__version__} does not have: {missing}")
    assert not {"protocol", "transport"} & used.keys(), \
        "the SMTP client's protocol and transport are its own: use its methods"


def test_no_private_member_of_another_object_is_touched() -> None:
    """`x._name` only for our own objects (`self`): never aiosmtplib's protocol, its
    transport or its `_drain_helper`."""
    found = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self")):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_upstream_imports_no_layer_above_it() -> None:
    found = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{name}: {t}" for t in targets
                      if any(t == m or t.startswith(m + ".") for m in ABOVE)]
    assert found == []


def test_no_upstream_module_is_much_over_300_lines() -> None:
    long = {p.name: n for p in UPSTREAM.glob("*.py")
            if (n := len(p.read_text().splitlines())) > 320}
    assert long == {}
