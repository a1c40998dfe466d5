import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_benchmark_update_machine_info(config, machine_info):
    from benchmarks.harness import machine_info as mi

    machine_info["fmkernels"] = mi()
