#!/usr/bin/env python3
"""Packs files into a single-layer OCI image tarball that `ctr images import` accepts.

The test bed has no Docker engine, so images are assembled directly: a rootfs layer
(a tar of the given files), an image config (entrypoint, user, env), a manifest and an
index naming the image. Output is deterministic (fixed mtimes, sorted entries), so the
same inputs give the same image digest.

usage: oci-image.py --name REF --out FILE.tar --entrypoint /path [--arg A ...] [--user UID]
                    [--env K=V ...] [--workdir DIR] SRC:DEST [SRC:DEST ...]
       SRC:DEST copies a host file to DEST in the image; a binary's shared libraries
       are added with --with-libs (resolved through ldd).
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

EPOCH = 0


def ldd_deps(path):
    """Shared libraries a binary loads, including the dynamic loader."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True)
    if out.returncode != 0 or "not a dynamic executable" in out.stdout + out.stderr:
        return []
    deps = []
    for line in out.stdout.splitlines():
        parts = line.split()
        if "=>" in parts:
            i = parts.index("=>")
            if i + 1 < len(parts) and parts[i + 1].startswith("/"):
                deps.append(parts[i + 1])
        elif parts and parts[0].startswith("/"):
            deps.append(parts[0])
    return deps


def add_file(tar, src, dest, seen, mode=None):
    dest = dest.lstrip("/")
    parts = dest.split("/")
    for i in range(1, len(parts)):
        d = "/".join(parts[:i])
        if d not in seen:
            seen.add(d)
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = EPOCH
            tar.addfile(info)
    if dest in seen:
        return
    seen.add(dest)
    data = open(os.path.realpath(src), "rb").read()
    info = tarfile.TarInfo(dest)
    info.size = len(data)
    info.mode = mode if mode is not None else (os.stat(src).st_mode & 0o777)
    info.mtime = EPOCH
    tar.addfile(info, io.BytesIO(data))


def blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    layout[f"blobs/sha256/{digest}"] = data
    return f"sha256:{digest}", len(data)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True, help="image reference, e.g. sluice.dev/consumer:dev")
    p.add_argument("--out", required=True)
    p.add_argument("--entrypoint", required=True, help="the program to run")
    p.add_argument("--arg", action="append", default=[], help="an argument after the entrypoint (repeatable)")
    p.add_argument("--user", default="65532:65532")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--workdir", default="/")
    p.add_argument("--with-libs", action="store_true", help="add each file's shared libraries")
    p.add_argument("files", nargs="+", help="SRC:DEST")
    a = p.parse_args()

    entries = []
    for spec in a.files:
        src, _, dest = spec.partition(":")
        if not os.path.isfile(src):
            sys.exit(f"oci-image: {src} is not a file")
        entries.append((src, dest or "/" + os.path.basename(src)))
        if a.with_libs:
            entries.extend((lib, lib) for lib in ldd_deps(src))

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        seen = set()
        # /tmp for programs that need scratch space; /etc/passwd naming the runtime user
        for d in ["tmp"]:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777
            info.mtime = EPOCH
            tar.addfile(info)
            seen.add(d)
        uid = a.user.split(":")[0]
        passwd = f"root:x:0:0:root:/:/nonexistent\nnonroot:x:{uid}:{uid}:nonroot:/:/nonexistent\n".encode()
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        info.mode = 0o644
        info.mtime = EPOCH
        seen.add("etc")
        d = tarfile.TarInfo("etc")
        d.type = tarfile.DIRTYPE
        d.mode = 0o755
        d.mtime = EPOCH
        tar.addfile(d)
        tar.addfile(info, io.BytesIO(passwd))
        seen.add("etc/passwd")
        for src, dest in sorted(entries, key=lambda e: e[1]):
            add_file(tar, src, dest, seen)
    layer_tar = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=EPOCH) as z:
        z.write(layer_tar)

    layout = {}
    layer_digest, layer_size = blob(layout, gz.getvalue())
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": [a.entrypoint] + a.arg,
            "User": a.user,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"] + a.env,
            "WorkingDir": a.workdir,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    cfg_digest, cfg_size = blob(layout, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}],
    }
    man_digest, man_size = blob(layout, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": man_digest,
            "size": man_size,
            "annotations": {
                "io.containerd.image.name": a.name,
                "org.opencontainers.image.ref.name": a.name.rsplit(":", 1)[-1],
            },
        }],
    }
    layout["index.json"] = json.dumps(index, sort_keys=True).encode()
    layout["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with tarfile.open(a.out, "w") as out:
        for name in sorted(layout):
            data = layout[name]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = EPOCH
            out.addfile(info, io.BytesIO(data))
    print(f"{a.name} {man_digest} {a.out}")


if __name__ == "__main__":
    main()
