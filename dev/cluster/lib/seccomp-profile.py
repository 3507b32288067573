#!/usr/bin/env python3
"""Write crucible's seccomp profile for executor pods (an OCI ``LinuxSeccomp`` JSON, the
format containerd loads for ``seccompProfile: {type: Localhost}``).

It is containerd's own default profile (``RuntimeDefault``) as it applies to a container
with every capability dropped on an x86_64 or arm64 node, minus what the local sandbox's
filter refuses (``SECCOMP_DENY_X86_64`` in ``backends/local/seccomp.py``), and with
sockets restricted to the families a cell needs: an allow-list with EPERM as the default,
so nothing the runtime's default refuses becomes allowed. The allow-list is read from
containerd's source (``contrib/seccomp/seccomp_default.go``, the module the dev cluster's
Go build downloads); regenerate after moving to a newer containerd:

    src=/var/cache/crucible-cluster/gomodcache/github.com/containerd/containerd@v1.7.28
    python3 dev/cluster/lib/seccomp-profile.py $src/contrib/seccomp/seccomp_default.go \\
        > crucible_jupyter/backends/kubernetes/seccomp-executor.json
"""

from __future__ import annotations

import json
import re
import sys

#: Refused on top of containerd's default (which already refuses keyrings, userfaultfd,
#: eBPF, perf events, module loading and mounting without capabilities): the local
#: sandbox's list, so both backends refuse the same calls.
DENY = {
    "add_key", "request_key", "keyctl",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "bpf", "userfaultfd", "perf_event_open",
    "process_vm_readv", "process_vm_writev", "ptrace",
    "pidfd_getfd", "kcmp", "process_madvise",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "mount", "umount", "umount2", "pivot_root", "unshare", "setns",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "acct", "swapon", "swapoff", "reboot", "syslog", "quotactl", "lookup_dcookie",
    "socket", "socketpair", "socketcall",  # allowed below for some families only
}  # fmt: skip
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, NETLINK_ROUTE = 1, 2, 10, 16, 0
NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWCGROUP
ENOSYS = 38


def _lists(go: str) -> list[list[str]]:
    return [
        re.findall(r'"([a-z0-9_]+)"', m.group(1))
        for m in re.finditer(r"Names:\s*\[\]string\{(.*?)\}", go, re.S)
    ]


def allowed_by_containerd(go: str) -> set[str]:
    """The names containerd's default profile allows without arguments checks, for a
    container without capabilities on a kernel >= 4.8, on amd64 (and arm64: its block
    only adds 32-bit arm calls)."""
    lists = _lists(go)
    base = lists[0]  # the first, long list: allowed everywhere
    k48 = next(
        names for names in lists if names[:3] == ["process_vm_readv", "process_vm_writev", "ptrace"]
    )
    amd64 = next(names for names in lists if names == ["arch_prctl", "modify_ldt"])
    return set(base) | set(k48) | set(amd64)


def arg(index: int, value: int, op: str = "SCMP_CMP_EQ", two: int = 0) -> dict:
    return {"index": index, "value": value, "valueTwo": two, "op": op}


def profile(go: str) -> dict:
    """The profile: containerd's allow-list minus :data:`DENY`, then the calls allowed for
    some arguments only (sockets, personality, clone without namespaces; clone3 ENOSYS)."""
    allow = sorted(allowed_by_containerd(go) - DENY)
    rules = [{"names": allow, "action": "SCMP_ACT_ALLOW"}]
    rules += [
        {"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [arg(0, family)]}
        for family in (AF_UNIX, AF_INET, AF_INET6)
    ]
    rules.append({"names": ["socket"], "action": "SCMP_ACT_ALLOW",
                  "args": [arg(0, AF_NETLINK), arg(2, NETLINK_ROUTE)]})  # fmt: skip
    rules.append({"names": ["socketpair"], "action": "SCMP_ACT_ALLOW", "args": [arg(0, AF_UNIX)]})
    rules += [
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [arg(0, persona)]}
        for persona in (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF)
    ]
    rules.append({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                  "args": [arg(0, NAMESPACE_FLAGS, "SCMP_CMP_MASKED_EQ", 0)]})  # fmt: skip
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,  # EPERM
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
        "syscalls": rules,
    }


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        source = f.read()
    print(json.dumps(profile(source), indent=1))
