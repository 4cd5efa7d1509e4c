#!/usr/bin/env python3
"""Generate qm/_proto from protos/ with grpcio-tools; `--check` fails if the tree is stale.

The generated files are committed so an installed package needs no compiler; CI runs
`--check` so a .proto change without regeneration cannot land.

Layout: protos/ is laid out by protobuf package (protos/qm/v1/task_queue.proto holds
package qm.v1), as `buf lint` wants, and the generated modules keep that layout under
qm/_proto: qm/_proto/qm/v1/task_queue_pb2.py. protoc writes an import of another
generated file from its proto path (`from qm.v1 import task_queue_pb2`), which would name
the hand-written `qm` package; those import lines are rewritten to the package the
modules really live in (`from qm._proto.qm.v1 import task_queue_pb2`). Descriptors keep
their proto paths (qm/v1/task_queue.proto), which is what server reflection shows.
"""
import argparse
import filecmp
import pathlib
import re
import shutil
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = pathlib.PurePosixPath("qm/_proto")
#: An import protoc wrote for a generated module of ours, in .py and .pyi files alike.
OWN_IMPORT = re.compile(r"^from (qm(?:\.\w+)*) import (\w+_pb2(?:_grpc)?) as ", re.MULTILINE)
INIT_TEXT = '"""Generated from protos/ by scripts/gen_protos.py; do not edit."""\n'


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Compile every .proto under protos/ into out_root/qm/_proto; return the generated
    paths relative to out_root."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    compiled = out_root / "protoc"
    compiled.mkdir()
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={compiled}",
            f"--pyi_out={compiled}", f"--grpc_python_out={compiled}"]
    if protoc.main(args + [str(p) for p in protos]) != 0:
        raise SystemExit("protoc failed")
    package_dir = out_root / OUT_PACKAGE
    for source in sorted(p for p in compiled.rglob("*") if p.is_file()):
        target = package_dir / source.relative_to(compiled)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(OWN_IMPORT.sub(_prefixed, source.read_text()))
    shutil.rmtree(compiled)
    for directory in [package_dir, *(p for p in package_dir.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").write_text(INIT_TEXT)
    return sorted(p.relative_to(out_root) for p in package_dir.rglob("*") if p.is_file())


def _prefixed(match: re.Match) -> str:
    module, name = match.groups()
    return f"from {'.'.join(OUT_PACKAGE.parts)}.{module} import {name} as "


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if qm/_proto is not current")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(pathlib.Path(tmp))
        target = ROOT / OUT_PACKAGE
        existing = sorted(p.relative_to(ROOT) for p in target.rglob("*")
                          if p.is_file() and "__pycache__" not in p.parts) if target.exists() else []
        if args.check:
            stale = [str(p) for p in set(generated) | set(existing)
                     if not (ROOT / p).exists() or not (pathlib.Path(tmp) / p).exists()
                     or not filecmp.cmp(ROOT / p, pathlib.Path(tmp) / p, shallow=False)]
            if stale:
                print("generated protobuf code is stale; run scripts/gen_protos.py:", *sorted(stale), sep="\n  ")
                return 1
            print("qm/_proto is current")
            return 0
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(pathlib.Path(tmp) / OUT_PACKAGE, target)
        print(f"wrote {len(generated)} files to {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
