"""Storage every node sees: checked up front, before any work.

On a cluster, a run's folders are written on many nodes and read on others: Ray Data tasks write
the shards on any node while the driver writes their manifest, rank 0 writes the export and the
registry on its node, the scorer reads them on another. A folder on one node's own disk breaks
that, and Ray Train would only notice at its first checkpoint upload, hundreds of steps in. So
before any work the driver writes a token into each local folder and every node reads it back; a
node that cannot is refused in seconds, with the folder named and the fix.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.k8s import MOUNT
from contract.errors import UserError

CHECK_TIMEOUT_S = 60
PROBE = ".dolly-storage-check"


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


@ray.remote(num_cpus=0)  # the head of a KubeRay cluster runs no tasks that claim CPUs
def _read_token(files: list[str]) -> list[str | None]:
    tokens = []
    for file in files:
        try:
            tokens.append(Path(file).read_text())
        except OSError:
            tokens.append(None)
    return tokens


def check_shared(folders: dict[str, str | Path], timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Refuse any of `folders` (setting name -> path) that a node of this cluster does not see as
    this driver does; URIs (s3://, gs://) are shared by nature. On one node, with the driver on
    it, there is nothing to check."""
    local = {name: Path(path).absolute() for name, path in folders.items() if path is not None and not is_uri(path)}
    nodes = [n for n in ray.nodes() if n["Alive"]]
    here = ray.get_runtime_context().get_node_id()
    if not local or (len(nodes) == 1 and nodes[0]["NodeID"] == here):
        return
    token = secrets.token_hex(8)
    probes = {}
    for name, folder in local.items():
        folder.mkdir(parents=True, exist_ok=True)
        probes[name] = folder / f"{PROBE}-{token}"
        probes[name].write_text(token)
    try:
        files = [str(p) for p in probes.values()]
        # Named by address and id: nodes on one machine share an address.
        reads = {
            f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})": _read_token.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(files)
            for node in nodes
        }
        answers = dict(zip(reads, ray.get(list(reads.values()), timeout=timeout_s)))
    finally:
        for probe in probes.values():
            probe.unlink(missing_ok=True)
    for i, (name, folder) in enumerate(local.items()):
        blind = sorted(node for node, tokens in answers.items() if tokens[i] != token)
        if blind:
            raise UserError(_not_shared(name, folder, blind, len(nodes)))


def _not_shared(name: str, folder: Path, blind: list[str], nodes: int) -> str:
    where = f"node(s) {', '.join(blind)}"
    if len(blind) == nodes:
        # No node sees it: the driver writes somewhere the cluster does not, a laptop driving the
        # cluster through Ray Client, say.
        return (
            f"{name}={folder} is not on the cluster's storage: no node of the cluster can read what this driver "
            f"wrote there ({where}). This driver's disk is not the cluster's (Ray Client from another machine?): "
            f"run it on the cluster as a Ray job (`dolly submit ...`, or KubeRay's RayJob: k8s/README.md), "
            f"or set {name} to a folder every node mounts at that same path"
        )
    return (
        f"{name}={folder} is not shared storage: {where} of this {nodes}-node cluster cannot read what this driver "
        f"wrote there, and the run's stages write it on one node and read it on another. Set {name} to a folder "
        f"every node mounts at the same path (on KubeRay the ReadWriteMany volume at {MOUNT}, e.g. "
        f"{name}={MOUNT}/{folder.name}), or, where the setting takes one, a URI (s3://bucket/path, gs://bucket/path)"
    )
