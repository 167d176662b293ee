"""A Griffe extension for the API reference (mkdocs.yml loads it; it is not part of aioshm).

aioshm's docstrings are written for ``help()`` and Sphinx: ``:class:`Lock```,
``:meth:`send```, ``:func:`aioshm.items_sent```. mkdocstrings renders Markdown, so this
extension rewrites each role before rendering:

* a role naming a public object (one reachable from ``aioshm``'s ``__all__``) becomes a
  cross-reference to its entry in the reference, so ``mkdocs build --strict`` fails if
  that entry is missing;
* a role naming a private object (``aioshm._layout.HEADER_RESERVE``) or an object of
  another library (``anyio.WouldBlock``) becomes plain code;
* a role naming nothing at all is a broken reference: it is logged as a warning, which
  fails a strict build.

It also gives a class built by ``__new__`` alone (``open_channel``, a tuple subclass
that reads as a function) the signature of its ``__new__``, which Griffe does not look
at, so that its parameters are documented against a signature.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import griffe

_logger = griffe.logger

_ROLE = re.compile(
    r":(?:py:)?(?P<role>func|meth|class|exc|attr|data|const|obj|mod):`(?P<text>[^`]+)`"
)
_TITLED = re.compile(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>")
_CALLABLE_ROLES = {"func", "meth"}


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in the docstrings of a package into Markdown."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        public = _public_targets(pkg)
        for obj in _walk(pkg):
            if isinstance(obj, griffe.Class):
                _signature_from_new(obj)
            if obj.docstring is not None:
                obj.docstring.value = _ROLE.sub(
                    lambda match, obj=obj: _rewrite(match, obj, pkg, public),  # type: ignore[misc]
                    obj.docstring.value,
                )


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias and isinstance(member, griffe.Object):
            found.extend(_walk(member))
    return found


def _public_targets(pkg: griffe.Module) -> dict[str, str]:
    """Canonical path of each public export -> its public path."""
    exports = pkg.exports or [name for name in pkg.members if not name.startswith("_")]
    targets = {}
    for name in exports:
        member = pkg.members.get(str(name))
        if member is not None:
            targets[member.canonical_path] = f"{pkg.path}.{name}"
    return targets


def _signature_from_new(cls: griffe.Class) -> None:
    new = cls.members.get("__new__")
    if new is None or "__init__" in cls.members or not isinstance(new, griffe.Function):
        return
    params = list(new.parameters)[1:]  # without cls
    init = griffe.Function("__init__", parameters=griffe.Parameters(*params), returns=None)
    init.parent = cls
    cls.set_member("__init__", init)


def _resolve(name: str, obj: griffe.Object, pkg: griffe.Module) -> str | None:
    """The path of what ``name`` names in the scope of ``obj``: as looked up, except that
    a name imported from another module of the package is followed to where it is
    defined (so ``Lock`` in ``aioshm._condition`` is ``aioshm._lock.Lock``)."""
    scopes: list[griffe.Object] = []
    scope: griffe.Object | None = obj
    while scope is not None:
        if not isinstance(scope, griffe.Function | griffe.Attribute):
            scopes.append(scope)
        scope = scope.parent
    for base in scopes:
        found = _lookup(base, name.split("."))
        if found is not None:
            return found
    if name.startswith(pkg.path + ".") and _lookup(pkg, name.split(".")[1:]) is not None:
        return name
    return None


def _lookup(base: griffe.Object, parts: list[str]) -> str | None:
    """The path of what ``parts`` name from ``base`` (see :func:`_resolve`), if anything."""
    current: Any = base
    path = base.path
    for part in parts:
        try:
            members = current.all_members if current.is_class else current.members
        except griffe.AliasResolutionError:  # imported from another library
            return f"{path}.{part}"
        current = members.get(part)
        if current is None:
            return None
        path = f"{path}.{part}"
        if current.is_alias and not current.inherited:  # imported: where it is defined
            with contextlib.suppress(griffe.AliasResolutionError):  # another library's
                path = current.canonical_path
    return path


def _public_path(path: str, public: dict[str, str]) -> str | None:
    """The path under which ``path`` is documented, if it is public."""
    for canonical, public_path in public.items():
        for known in (canonical, public_path):
            if path == known or path.startswith(known + "."):
                rest = path[len(known) :].lstrip(".")
                if any(part.startswith("_") for part in rest.split(".") if part):
                    return None
                return f"{public_path}.{rest}" if rest else public_path
    return None


def _rewrite(
    match: re.Match[str], obj: griffe.Object, pkg: griffe.Module, public: dict[str, str]
) -> str:
    role, text = match["role"], match["text"]
    titled = _TITLED.fullmatch(text)
    target = titled["target"] if titled else text
    short = target.startswith("~")
    target = target.lstrip("~")
    if titled:
        title = titled["title"]
    else:
        title = target.rsplit(".", 1)[-1] if short else target
        if role in _CALLABLE_ROLES:
            title += "()"
    found = _resolve(target, obj, pkg)
    if found is None:
        if _public_path(obj.path, public) is not None and (
            "." not in target or target.split(".")[0] == pkg.path
        ):  # a documented docstring names nothing of this package: a broken reference
            _logger.warning(f"{obj.relative_filepath}: broken reference :{role}:`{text}`")
        return f"`{title}`"
    public_path = _public_path(found, public)
    if public_path is None:
        return f"`{title}`"
    return f"[`{title}`][{public_path}]"
