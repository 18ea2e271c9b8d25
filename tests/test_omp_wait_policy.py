"""The scripts set OMP_WAIT_POLICY=PASSIVE before torch loads (spinning OpenMP threads made a GRPO step 10-20x
slower while another program used a core), the compute scripts one torch thread (faster than two at the testbed's
size), and leave a user's own settings alone."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imports the script and prints the variable at the moment torch is first imported (OpenMP reads it then); stops
# there, since what torch would do next is not the question (and loading it took most of each test's time).
SPY = """
import os, sys
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print(os.environ.get("{variable}"), flush=True)
            os._exit(0)
sys.meta_path.insert(0, Spy())
import {script}
print("torch not imported")
"""


def policy_when_torch_loads(script, policy=None, variable="OMP_WAIT_POLICY"):
    env = {k: v for k, v in os.environ.items() if k != variable}
    if policy is not None:
        env[variable] = policy
    proc = subprocess.run([sys.executable, "-c", SPY.format(script=script, variable=variable)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("script", ["train_grpo", "cold_start", "evaluate", "prepare_data"])
def test_passive_before_torch_loads_when_unset(script):
    assert policy_when_torch_loads(script) == "PASSIVE"


def test_a_users_setting_wins():
    assert policy_when_torch_loads("train_grpo", policy="ACTIVE") == "ACTIVE"


@pytest.mark.parametrize("script", ["train_grpo", "cold_start", "evaluate"])
def test_one_torch_thread_when_unset(script):
    assert policy_when_torch_loads(script, variable="OMP_NUM_THREADS") == "1"


def test_a_users_thread_count_wins():
    assert policy_when_torch_loads("evaluate", policy="2", variable="OMP_NUM_THREADS") == "2"
