"""The pipe protocol pieces of `pipeline.serving.frontends` that need no processes (the rest runs for real in
tests/integration/serving/test_http_processes.py and under every API test)."""

from __future__ import annotations

import multiprocessing as mp
import pickle

from pipeline.domain.errors import CapacityExhausted, NotFound
from pipeline.serving.frontends import Sender, portable
from pipeline.serving.server import ModelNotFound


class _Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lambda")
        self.hook = lambda: None


def test_a_batch_crosses_as_one_message_and_what_does_not_pickle_comes_back_as_an_error():
    here, there = mp.Pipe(duplex=True)
    sender = Sender(here, "test-send")
    try:
        sender.put(("ok", 1))
        sender.put(("tok", [(1, [5, 6], False, None, None)]))
        assert there.poll(5)
        got = [m for _ in range(2) if there.poll(1) for m in there.recv()]
        assert got[:2] == [("ok", 1), ("tok", [(1, [5, 6], False, None, None)])]
        sender.put(("err", 7, _Unpicklable()))
        assert there.poll(5)
        (kind, rid, error), *_ = there.recv()
        assert (kind, rid) == ("err", 7) and isinstance(error, RuntimeError) and "could not be sent" in str(error)
    finally:
        sender.close()
        here.close()
        there.close()


def test_errors_cross_with_their_param_and_retry_hint_and_bugs_become_runtime_errors():
    for error in (ModelNotFound("no such model", param="model"), CapacityExhausted("full", retry_after_s=3.0)):
        back = pickle.loads(pickle.dumps(portable(error)))
        assert type(back) is type(error) and str(back) == str(error)
        assert back.param == error.param and back.retry_after_s == error.retry_after_s
    assert pickle.loads(pickle.dumps(NotFound("x"))).retry_after_s is None
    bug = portable(KeyError("slot"))
    assert isinstance(bug, RuntimeError) and "KeyError" in str(bug)
