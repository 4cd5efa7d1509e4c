"""Many tasks at once: none lost, each right, each ending exactly once on the stream."""
from __future__ import annotations

import collections
import concurrent.futures
import time

import qm

TASKS = 1000
SUBMIT_THREADS = 16
#: Bound on the whole batch finishing once submitted (it takes seconds).
BATCH_TIMEOUT_S = 120.0


def test_a_thousand_concurrent_tasks_all_succeed_once(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    workers = [launcher.worker(rabbitmq.url, procs=2, queues=queue) for _ in range(2)]
    expected = {f"{i} * 3 + 1": str(i * 3 + 1) for i in range(TASKS)}

    with qm.Client(server.address) as client:
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(SUBMIT_THREADS) as pool:
            submitted = list(pool.map(lambda expression: (client.submit("math", expression, queue=queue),
                                                          expression), expected))
        submit_s = time.monotonic() - started
        expression_of = dict(submitted)
        assert len(expression_of) == TASKS, "a task id was handed out twice"

        terminal_updates: collections.Counter[str] = collections.Counter()
        final = {}
        for status in client.watch(expression_of, timeout_s=BATCH_TIMEOUT_S):
            if status.terminal:
                terminal_updates[status.task_id] += 1
                final[status.task_id] = status
        elapsed_s = time.monotonic() - started

    logs = "\n".join(process.logs for process in [server, *workers])
    assert set(final) == set(expression_of), f"{TASKS - len(final)} tasks never finished\n{logs}"
    assert all(count == 1 for count in terminal_updates.values()), \
        [task_id for task_id, count in terminal_updates.items() if count != 1]
    wrong = {task_id: (status.state, status.result, status.error) for task_id, status in final.items()
             if (status.state, status.result) != ("SUCCEEDED", expected[expression_of[task_id]])}
    assert not wrong, f"{len(wrong)} tasks wrong, e.g. {list(wrong.items())[:5]}"
    assert {status.worker for status in final.values()} <= {worker.worker_id for worker in workers}
    print(f"\n{TASKS} math tasks: submitted in {submit_s:.2f} s ({TASKS / submit_s:.0f}/s); "
          f"all done in {elapsed_s:.2f} s ({TASKS / elapsed_s:.0f} tasks/s end to end) "
          f"with 2 workers x 2 children")
