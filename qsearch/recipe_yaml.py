"""Reading YAML recipes safely: the safe loader, bounded in size, nesting and alias
expansion, refusing duplicate keys. Errors name the file and the fix."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from qsearch import QSearchError

MAX_RECIPE_BYTES = 1_000_000  # recipes are a few KB: anything larger is refused unread
MAX_YAML_DEPTH = 50  # nesting levels
MAX_YAML_VALUES = 100_000  # values after alias expansion (a "billion laughs" is refused)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe as a dict (safe loader, bounded: see ``parse_yaml``); errors name the file
    and the fix."""
    p = Path(path)
    if not p.is_file():
        raise QSearchError(f"recipe {str(p)!r} not found: give a path to a YAML file, e.g. "
                           "experiments/leaderboard-fmnist.yaml")
    size = p.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise QSearchError(f"recipe {str(p)!r} is {size:,} bytes: recipes are a few KB, at "
                           f"most {MAX_RECIPE_BYTES:,}; give the YAML recipe, not a data file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise QSearchError(f"recipe {str(p)!r} is not a text file (not UTF-8): give a YAML "
                           "recipe, e.g. experiments/leaderboard-fmnist.yaml") from None
    data = parse_yaml(text, f"recipe {str(p)!r}")
    if not isinstance(data, dict):
        raise QSearchError(f"recipe {str(p)!r} must be a mapping of spec keys, "
                           f"got {type(data).__name__}")
    return data


def parse_yaml(text: str, what: str, fix: str = "fix the file") -> Any:
    """YAML with the safe loader, refusing duplicate keys (a silent "last one wins" hides
    typos), nesting beyond MAX_YAML_DEPTH and documents whose aliases expand beyond
    MAX_YAML_VALUES values (the "billion laughs"). ``what`` names the text in errors,
    ``fix`` says what to do."""
    import yaml

    loader = None
    try:
        loader = _bounded_loader()(text)  # refuses non-printable characters at once
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    except _Refused as e:
        raise QSearchError(f"{what} is refused at line {e.line}: {e}; {fix}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise QSearchError(f"{what} is not valid YAML{where}: {getattr(e, 'problem', e)}; "
                           f"{fix}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of 5000 digits
        raise QSearchError(f"{what} cannot be read: {str(e).split(';')[0]}; {fix}") from None
    finally:
        if loader is not None:
            loader.dispose()


class _Refused(Exception):
    """A YAML document beyond the loader's bounds, at a position (``line``, 1-based)."""

    def __init__(self, why: str, mark: Any):
        super().__init__(why)
        self.line = mark.line + 1


def _expanded_size(node: Any, sizes: dict[int, int], open_: set[int]) -> int:
    """Values a node stands for once its aliases are expanded (memoised per node)."""
    from yaml import MappingNode, SequenceNode

    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise _Refused("an alias refers to a value that contains it", node.start_mark)
    open_.add(id(node))
    children: list = []
    if isinstance(node, SequenceNode):
        children = node.value
    elif isinstance(node, MappingNode):
        children = [n for pair in node.value for n in pair]
    size = 1 + sum(_expanded_size(c, sizes, open_) for c in children)
    if size > MAX_YAML_VALUES:
        raise _Refused(f"more than {MAX_YAML_VALUES:,} values once aliases are expanded",
                       node.start_mark)
    open_.discard(id(node))
    sizes[id(node)] = size
    return size


@lru_cache(maxsize=1)
def _bounded_loader() -> type:
    import yaml
    from yaml.constructor import ConstructorError

    class Loader(yaml.SafeLoader):
        depth = values = 0

        def compose_node(self, parent, index):
            self.depth += 1
            self.values += 1  # stop early: composing is the slow part of a large file
            try:
                if self.depth > MAX_YAML_DEPTH or self.values > MAX_YAML_VALUES:
                    why = (f"nested deeper than {MAX_YAML_DEPTH} levels"
                           if self.depth > MAX_YAML_DEPTH else
                           f"more than {MAX_YAML_VALUES:,} values")
                    raise _Refused(why, self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in getattr(node, "value", []):
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool, type(None))):
                    continue  # the safe loader itself refuses unhashable keys
                if key in seen:
                    raise ConstructorError(None, None, f"duplicate key {key!r} (first at "
                                           f"line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

    return Loader
