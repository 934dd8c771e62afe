"""The engine's default thread count follows the CPUs the process may use (fake cgroup trees in tmp_path)."""

import os

import pytest

from edge_runtime._cpus import CpuLimits, cpu_limits
from edge_runtime.engine._session import default_threads


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_machines_cores_when_nothing_limits_the_process():
    assert CpuLimits(physical=4, logical=8, affinity_cpus=8, quota_cpus=None).usable == 4
    assert CpuLimits(physical=4, logical=4, affinity_cpus=None, quota_cpus=None).usable == 4


@pytest.mark.parametrize("affinity, expected", [(1, 1), (2, 1), (3, 2), (4, 2), (6, 3), (7, 4)])
def test_an_affinity_mask_counts_the_cores_behind_its_hardware_threads(affinity, expected):
    assert CpuLimits(physical=4, logical=8, affinity_cpus=affinity, quota_cpus=None).usable == expected


@pytest.mark.parametrize("quota, expected", [(0.5, 1), (1.0, 1), (1.5, 2), (2.0, 2), (16.0, 4)])
def test_a_cpu_quota_rounds_up_to_whole_threads_and_never_adds_any(quota, expected):
    assert CpuLimits(physical=4, logical=4, affinity_cpus=4, quota_cpus=quota).usable == expected


def test_cgroup_v2_quota_of_the_process_or_an_ancestor(tmp_path):
    _write(tmp_path, "proc/self/cgroup", "0::/system.slice/app.service\n")
    _write(tmp_path, "sys/fs/cgroup/system.slice/app.service/cpu.max", "max 100000\n")
    assert cpu_limits(tmp_path, affinity=64).quota_cpus is None
    # a limit set on the slice holds the service too
    _write(tmp_path, "sys/fs/cgroup/system.slice/cpu.max", "150000 100000\n")
    assert cpu_limits(tmp_path, affinity=64).quota_cpus == 1.5
    # the tighter of the two wins
    _write(tmp_path, "sys/fs/cgroup/system.slice/app.service/cpu.max", "50000 100000\n")
    assert cpu_limits(tmp_path, affinity=64).quota_cpus == 0.5


def test_cgroup_v2_inside_a_container_whose_path_names_the_hosts_hierarchy(tmp_path):
    # cgroupns=host: /proc/self/cgroup names /docker/<id>, but the container sees its own cgroup at the mount's root
    _write(tmp_path, "proc/self/cgroup", "0::/docker/0123abcd\n")
    _write(tmp_path, "sys/fs/cgroup/cpu.max", "200000 100000\n")
    limits = cpu_limits(tmp_path, affinity=64)
    assert limits.quota_cpus == 2.0
    assert limits.usable == min(2, limits.physical)


@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_cfs_quota(tmp_path, mount):
    _write(tmp_path, "proc/self/cgroup", "4:memory:/x\n3:cpu,cpuacct:/kubepods/pod1\n0::/\n")
    _write(tmp_path, f"sys/fs/cgroup/{mount}/kubepods/pod1/cpu.cfs_quota_us", "-1\n")
    _write(tmp_path, f"sys/fs/cgroup/{mount}/kubepods/pod1/cpu.cfs_period_us", "100000\n")
    assert cpu_limits(tmp_path, affinity=64).quota_cpus is None
    _write(tmp_path, f"sys/fs/cgroup/{mount}/kubepods/cpu.cfs_quota_us", "100000\n")
    _write(tmp_path, f"sys/fs/cgroup/{mount}/kubepods/cpu.cfs_period_us", "100000\n")
    assert cpu_limits(tmp_path, affinity=64).quota_cpus == 1.0
    assert cpu_limits(tmp_path, affinity=64).usable == 1


@pytest.mark.parametrize("text", ["", "garbage", "max", "0 100000", "100000 0", "-5 100000", "1 2 3", "\xff\xfe"])
def test_unreadable_or_odd_cgroup_files_mean_no_quota(tmp_path, text):
    _write(tmp_path, "proc/self/cgroup", "0::/a\n")
    _write(tmp_path, "sys/fs/cgroup/a/cpu.max", text)
    assert cpu_limits(tmp_path, affinity=64).quota_cpus is None


def test_no_proc_or_cgroup_files_at_all(tmp_path):
    limits = cpu_limits(tmp_path, affinity=None)
    assert limits.quota_cpus is None and limits.usable == limits.physical


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_the_engines_default_follows_this_processs_affinity():
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert default_threads() == 1
    finally:
        os.sched_setaffinity(0, before)
    assert default_threads() == cpu_limits().usable >= 1
