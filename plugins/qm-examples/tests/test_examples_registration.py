"""The declarations pass QueueMaster's checks, and the installed entry points are found."""
import importlib.metadata

from qm_examples import hash_chain, monte_carlo, primes, sum_results

from qm import registry
from qm.worker.child import run_job
from qm.worker.jobs import Reply, ReplyKind
from tests.requirements import missing

TASK_TYPES = {"examples.primes": primes.TASK_TYPE, "examples.hash_chain": hash_chain.TASK_TYPE,
              "examples.monte_carlo_pi": monte_carlo.TASK_TYPE, "examples.sum_results": sum_results.TASK_TYPE}


def require_install() -> None:
    """Skip a local run without the installed distribution; fail under CI=true, where
    scripts/setup installs it (tests/requirements.py)."""
    try:
        importlib.metadata.distribution("qm-examples")
    except importlib.metadata.PackageNotFoundError:
        missing("qm-examples is not installed (pip install -e plugins/qm-examples)")


def test_declarations_pass_the_registry_checks():
    checked = registry.validate(TASK_TYPES.values())
    assert checked.errors == ()
    assert checked.types == TASK_TYPES


def test_a_worker_child_runs_them_from_payload_bytes_to_result_bytes():
    checked = registry.validate(TASK_TYPES.values())
    ok = Reply(ReplyKind.OK, b'{"below": 100, "count": 25}')
    assert run_job(checked, "examples.primes", b'{"below": 100}') == ok
    assert run_job(checked, "examples.hash_chain", b"1:abc") == Reply(
        ReplyKind.OK, b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    reply = run_job(checked, "examples.monte_carlo_pi", b'{"samples": 100, "seed": 5}')
    assert reply.kind is ReplyKind.OK and reply.value.startswith(b'{"pi": ')
    reply = run_job(checked, "examples.primes", b'{"below": 0}')
    assert reply.kind is ReplyKind.PERMANENT and "payload.below" in reply.value


def test_installed_entry_points_are_discovered_without_errors():
    require_install()
    ours = [ep for ep in registry.find() if ep.dist is not None and ep.dist.name == "qm-examples"]
    assert sorted(ep.name for ep in ours) == sorted(TASK_TYPES)
    found = registry.discover()
    problems = [str(error) for error in found.errors
                if "qm-examples" in str(error) or any(name in str(error) for name in TASK_TYPES)]
    assert problems == []
    for name, declared in TASK_TYPES.items():
        served = found.get(name)  # the declaration, with the distribution it came from recorded
        assert served == declared and served.distribution == "qm-examples"


def test_runs_through_a_real_pool_child_with_its_limits():
    """qm.testing.run_task: validator, limit resolution and a fresh child, as a worker would."""
    require_install()
    from qm.testing import run_task

    done = run_task("examples.primes", {"below": 1000})
    assert (done.state, done.value) == ("SUCCEEDED", {"below": 1000, "count": 168})
    assert (done.timeout_s, done.memory_limit_mb) == (60, 512)  # the type's defaults
    late = run_task("examples.hash_chain", "50000000:x", timeout_s=2.0, soft_timeout_s=0.5)
    assert late.state == "TIMED_OUT" and "SoftTimeout" in late.error  # left to propagate
