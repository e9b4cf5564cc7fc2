"""The gRPC contract: committed stubs match the protos, and every element is documented.

The protos are the product's public API, so (a) the stubs under headway/v1 must be exactly
what `protos/generate.py` produces from them today, and (b) every message, field, oneof,
enum, enum value, service and RPC must carry a leading doc comment. Tensor packing round
trips are tested with the code that packs them, not here.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from google.protobuf import descriptor_pb2

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMITTED = REPO_ROOT / "headway" / "v1"
EXPECTED_PROTOS = {"common", "model", "sampling", "training", "trace", "tinker"}

# Field numbers of descriptor.proto, used to build source_code_info location paths.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM, MESSAGE_ONEOF = 2, 3, 4, 8
ENUM_VALUE = 2
SERVICE_METHOD = 2


def _load_generator() -> ModuleType:
    """Import protos/generate.py (protos/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "headway_protos_generate", REPO_ROOT / "protos" / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


generator = _load_generator()


def _stub_files(package: Path) -> dict[str, bytes]:
    """Map each file name of a generated package (caches excluded) to its bytes."""
    return {
        path.name: path.read_bytes()
        for path in sorted(package.iterdir())
        if path.is_file() and path.suffix != ".pyc"
    }


def test_contract_has_its_protos() -> None:
    assert {path.stem for path in generator.proto_files()} == EXPECTED_PROTOS


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    written = generator.generate(tmp_path)
    fresh = _stub_files(tmp_path / "headway" / "v1")
    assert sorted(fresh) == sorted(path.name for path in written)
    committed = _stub_files(COMMITTED)

    missing = sorted(set(fresh) - set(committed))
    extra = sorted(set(committed) - set(fresh))
    differ = sorted(name for name in set(fresh) & set(committed) if fresh[name] != committed[name])
    assert not (missing or extra or differ), (
        f"stale stubs: run `make protos` (missing: {missing}, extra: {extra}, different: {differ})"
    )


def _documented_elements(
    proto: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Yield (qualified name, source location path) of every element that needs a doc."""

    def enum(desc: descriptor_pb2.EnumDescriptorProto, name: str, path: tuple[int, ...]):
        yield name, path
        for i, value in enumerate(desc.value):
            yield f"{name}.{value.name}", (*path, ENUM_VALUE, i)

    def message(desc: descriptor_pb2.DescriptorProto, name: str, path: tuple[int, ...]):
        if desc.options.map_entry:  # synthetic type of a map field: has no source
            return
        yield name, path
        for i, field in enumerate(desc.field):
            yield f"{name}.{field.name}", (*path, MESSAGE_FIELD, i)
        for i, oneof in enumerate(desc.oneof_decl):
            members = [f for f in desc.field if f.HasField("oneof_index") and f.oneof_index == i]
            if not all(f.proto3_optional for f in members):  # skip `optional`'s synthetic oneof
                yield f"{name}.{oneof.name}", (*path, MESSAGE_ONEOF, i)
        for i, nested in enumerate(desc.nested_type):
            yield from message(nested, f"{name}.{nested.name}", (*path, MESSAGE_NESTED, i))
        for i, nested_enum in enumerate(desc.enum_type):
            yield from enum(nested_enum, f"{name}.{nested_enum.name}", (*path, MESSAGE_ENUM, i))

    for i, desc in enumerate(proto.message_type):
        yield from message(desc, desc.name, (FILE_MESSAGE, i))
    for i, desc in enumerate(proto.enum_type):
        yield from enum(desc, desc.name, (FILE_ENUM, i))
    for i, service in enumerate(proto.service):
        yield service.name, (FILE_SERVICE, i)
        for j, method in enumerate(service.method):
            yield f"{service.name}.{method.name}", (FILE_SERVICE, i, SERVICE_METHOD, j)


def test_every_contract_element_has_a_doc_comment(tmp_path: Path) -> None:
    descriptor_set = tmp_path / "contract.pb"
    generator.run_protoc(
        [
            f"--descriptor_set_out={descriptor_set}",
            "--include_source_info",
            *(str(path) for path in generator.proto_files()),
        ]
    )
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    assert {Path(f.name).stem for f in files} == EXPECTED_PROTOS

    undocumented: list[str] = []
    checked = 0
    for proto in files:
        comments = {
            tuple(location.path): location.leading_comments.strip()
            for location in proto.source_code_info.location
        }
        for name, path in _documented_elements(proto):
            checked += 1
            if not comments.get(path):
                undocumented.append(f"{proto.name}: {proto.package}.{name}")
    assert checked > 200, f"only {checked} elements found: the descriptor walk is broken"
    assert not undocumented, "elements without a leading // comment:\n" + "\n".join(undocumented)
