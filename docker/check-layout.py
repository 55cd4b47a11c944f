#!/usr/bin/env python3
"""Checks that the deployment files put PostgreSQL's data where the image's major expects.

From 18 on the official image keeps its data in /var/lib/postgresql/<major>/docker and
wants the volume at /var/lib/postgresql (it refuses to initialise when something is
mounted at /var/lib/postgresql/data); up to 17 both are /var/lib/postgresql/data. A
manifest that mixes the two starts an empty cluster or does not start at all, and no
schema validation notices, so scripts/lint.sh runs this.

Usage: docker/check-layout.py FILE...   (Kubernetes manifests and compose files)
Prints one line per problem and exits 1 when there is any. Needs PyYAML.
"""

import re
import sys

import yaml

# postgres:18-bookworm, postgres:18, pg-password-sync:pg18
IMAGE_MAJOR = re.compile(r"(?:^|/)(?:postgres:(\d+)|pg-password-sync:pg(\d+))(?:[.-]|$)")


def image_major(image):
    """The PostgreSQL major an image reference names, or None."""
    match = IMAGE_MAJOR.search(image or "")
    if not match:
        return None
    return int(match.group(1) or match.group(2))


def expected(major):
    """(volume mount point, PGDATA or its parent) for a major."""
    if major >= 18:
        return "/var/lib/postgresql", f"/var/lib/postgresql/{major}/docker"
    return "/var/lib/postgresql/data", "/var/lib/postgresql/data"


def check_container(where, container):
    """Problems of one Kubernetes container: its PGDATA and its data volume mount."""
    major = image_major(container.get("image"))
    env = {e.get("name"): e.get("value") for e in container.get("env") or []}
    pgdata = env.get("PGDATA")
    mounts = container.get("volumeMounts") or []
    data_mounts = [m for m in mounts if m.get("mountPath", "").startswith("/var/lib/postgresql")]
    if major is None or (pgdata is None and not data_mounts):
        return []
    mount_point, data_dir = expected(major)
    problems = []
    name = f"{where}: container {container.get('name')!r} (PostgreSQL {major})"
    if pgdata is not None and not (pgdata == data_dir or pgdata.startswith(data_dir + "/")):
        problems.append(f"{name}: PGDATA is {pgdata}, expected {data_dir}")
    for mount in data_mounts:
        if mount["mountPath"] != mount_point:
            problems.append(f"{name}: volume {mount.get('name')!r} mounted at "
                            f"{mount['mountPath']}, expected {mount_point}")
    if pgdata is not None and not any(m["mountPath"] == mount_point for m in data_mounts):
        problems.append(f"{name}: no volume at {mount_point}: the data would live in the container")
    return problems


def check_k8s(path, doc):
    spec = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    problems = []
    for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        problems += check_container(f"{path} {doc.get('kind')}/{doc['metadata']['name']}",
                                    container)
    return problems


def check_compose(path, doc):
    problems = []
    for name, service in (doc.get("services") or {}).items():
        major = image_major(service.get("image"))
        args = (service.get("build") or {}).get("args") or {}
        if "PG_MAJOR" in args:
            build_major = int(args["PG_MAJOR"])
            if major is not None and build_major != major:
                problems.append(f"{path}: service {name!r}: image says {major}, "
                                f"build arg PG_MAJOR says {build_major}")
            major = build_major
        if major is None:
            continue
        mount_point, _ = expected(major)
        targets = []
        for volume in service.get("volumes") or []:
            target = volume.get("target") if isinstance(volume, dict) else volume.split(":")[1]
            if target.startswith("/var/lib/postgresql"):
                targets.append(target)
        if targets != [mount_point]:
            problems.append(f"{path}: service {name!r} (PostgreSQL {major}): data volume at "
                            f"{targets or 'nowhere'}, expected exactly {mount_point}")
    return problems


def main(paths):
    problems = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for doc in yaml.safe_load_all(handle):
                if not isinstance(doc, dict):
                    continue
                if "services" in doc:
                    problems += check_compose(path, doc)
                elif doc.get("kind") in ("StatefulSet", "Deployment", "Job", "Pod"):
                    problems += check_k8s(path, doc)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
