#!/usr/bin/env python3
"""Generate qm/_proto from protos/ with grpcio-tools; `--check` fails if the tree is stale.

The generated files are committed so an installed package needs no compiler; CI runs
`--check` so a .proto change without regeneration cannot land.
"""
import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = pathlib.PurePosixPath("qm/_proto")


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Compile every .proto under protos/ into out_root; return the generated paths."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}"]
    if protoc.main(args + [str(p) for p in protos]) != 0:
        raise SystemExit("protoc failed")
    package_dir = out_root / OUT_PACKAGE
    (package_dir / "__init__.py").write_text('"""Generated from protos/ by scripts/gen_protos.py; do not edit."""\n')
    return sorted(p.relative_to(out_root) for p in package_dir.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
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
