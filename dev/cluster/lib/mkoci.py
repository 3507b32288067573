#!/usr/bin/env python3
"""Pack a root filesystem directory into a single-layer OCI image archive.

Usage: mkoci.py ROOTFS OUT.tar NAME [--cmd ARG ...] [--entrypoint JSON-LIST] [--env K=V ...]
                 [--workdir DIR] [--user UID[:GID]]

The archive is what `ctr -n k8s.io images import` reads; the image is named
NAME through the io.containerd.image.name annotation.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rootfs")
    ap.add_argument("out")
    ap.add_argument("name")
    ap.add_argument("--cmd", nargs="*", default=["/bin/sh"])
    ap.add_argument("--env", action="append", default=[])
    # a JSON list: its words may start with "-" (["/usr/bin/tini", "-g", "--"])
    ap.add_argument("--entrypoint", type=json.loads, default=None)
    ap.add_argument("--workdir", default="/")
    # numeric, so that Kubernetes' runAsNonRoot can check it without a passwd lookup
    ap.add_argument("--user", default=None)
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="mkoci.", dir=os.path.dirname(os.path.abspath(a.out)))
    try:
        blobs = os.path.join(work, "blobs", "sha256")
        os.makedirs(blobs)
        layer_tar = os.path.join(work, "layer.tar")
        # GNU tar keeps device nodes, xattrs-free, numeric owners, sorted names.
        subprocess.run(
            [
                "tar",
                "--numeric-owner",
                "--sort=name",
                "--mtime=@0",
                "-C",
                a.rootfs,
                "-cf",
                layer_tar,
                ".",
            ],
            check=True,
        )
        diff_id = sha256_file(layer_tar)
        layer_gz = os.path.join(work, "layer.tar.gz")
        subprocess.run(["gzip", "-1", "-n", layer_tar], check=True)
        layer_digest = sha256_file(layer_gz)
        layer_size = os.path.getsize(layer_gz)
        os.rename(layer_gz, os.path.join(blobs, layer_digest))

        def put(obj):
            data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
            d = hashlib.sha256(data).hexdigest()
            with open(os.path.join(blobs, d), "wb") as f:
                f.write(data)
            return d, len(data)

        env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        env = [e for e in env if e.split("=")[0] not in {v.split("=")[0] for v in a.env}]
        env += a.env
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {
                "Env": env,
                "Cmd": a.cmd,
                "WorkingDir": a.workdir,
                **({"Entrypoint": a.entrypoint} if a.entrypoint else {}),
                **({"User": a.user} if a.user else {}),
            },
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id]},
            "history": [
                {"created": "1970-01-01T00:00:00Z", "created_by": "crucible dev/cluster mkoci.py"}
            ],
        }
        cd, cs = put(config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + cd,
                "size": cs,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": "sha256:" + layer_digest,
                    "size": layer_size,
                }
            ],
        }
        md, ms = put(manifest)
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": "sha256:" + md,
                    "size": ms,
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": a.name,
                        "org.opencontainers.image.ref.name": a.name.rsplit(":", 1)[-1],
                    },
                }
            ],
        }
        with open(os.path.join(work, "index.json"), "w") as f:
            json.dump(index, f)
        with open(os.path.join(work, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        tmp_out = a.out + ".tmp"
        with tarfile.open(tmp_out, "w") as t:
            for n in ("oci-layout", "index.json", "blobs"):
                t.add(os.path.join(work, n), arcname=n)
        os.replace(tmp_out, a.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
