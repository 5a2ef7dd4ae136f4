"""Vendor KubeRay's CRD schemas for the manifest tests: `cluster/schemas/kuberay-<version>/<Kind>.json.gz`.

Reads the three CRDs of a KubeRay release (`ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,
rayservices}.yaml` of a checkout at that tag), keeps the `v1` version's openAPIV3Schema without `status` (the
manifests never set it), and writes it gzipped with `source.json` (the version and each CRD's sha256).

Run: .venv/bin/python scripts/vendor_kuberay_schemas.py --crd-dir DIR --version v1.7.0
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crd-dir", type=Path, required=True, help="folder holding the three CRD YAML files")
    parser.add_argument("--version", required=True, help="the KubeRay release they come from, e.g. v1.7.0")
    args = parser.parse_args()
    out = ROOT / "cluster" / "schemas" / f"kuberay-{args.version}"
    out.mkdir(parents=True, exist_ok=True)
    source = {"kuberay_version": args.version, "crd_version": "v1", "files": {}}
    for kind, name in CRDS.items():
        raw = (args.crd_dir / name).read_bytes()
        crd = yaml.safe_load(raw)
        assert crd["spec"]["names"]["kind"] == kind, name
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = version["schema"]["openAPIV3Schema"]
        schema["properties"].pop("status", None)
        text = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
        (out / f"{kind}.json.gz").write_bytes(gzip.compress(text, compresslevel=9, mtime=0))
        source["files"][name] = {"kind": kind, "sha256": hashlib.sha256(raw).hexdigest()}
    (out / "source.json").write_text(json.dumps(source, indent=2) + "\n")


if __name__ == "__main__":
    main()
