"""Pipeline stages on plain counting streams: the mixture's shares follow the weights (and skip a
finished source), the shuffle buffer emits a permutation, and both resume exactly."""

from itertools import islice

import numpy as np

from newtonlm.data.pipeline import Mixture, ShuffleBuffer


class Counting:
    """A stream yielding [tag, i] for i = 0, 1, ... (``length`` of them if given)."""

    def __init__(self, tag: int, length: int | None = None, state: dict | None = None):
        self.tag, self.length = tag, length
        self.state = dict(state) if state else {"next": 0}

    def state_dict(self) -> dict:
        return dict(self.state)

    @property
    def exhausted(self) -> bool:
        return self.length is not None and self.state["next"] >= self.length

    def __iter__(self):
        while not self.exhausted:
            i = self.state["next"]
            self.state = {"next": i + 1}
            yield np.array([self.tag, i])


def test_mixture_shares_follow_the_weights():
    mixture = Mixture([Counting(0), Counting(1)], [3.0, 1.0], key=7)
    seqs = [tuple(int(x) for x in s) for s in islice(mixture, 4000)]
    from_first = sum(t == 0 for t, _ in seqs)
    assert abs(from_first - 3000) < 4 * (4000 * 0.75 * 0.25) ** 0.5  # 4 standard deviations
    for tag in (0, 1):  # each source's sequences come in order, none skipped
        own = [i for t, i in seqs if t == tag]
        assert own == list(range(len(own)))


def test_mixture_continues_without_a_finished_source_and_resumes():
    def make(state=None):
        state = state or {"draws": 0, "sources": [None, None]}
        streams = [Counting(0, length=20, state=state["sources"][0]), Counting(1, state=state["sources"][1])]
        return Mixture(streams, [1.0, 1.0], key=3, draws=state["draws"])

    reference = make()
    out, states = [], []
    for seq in islice(reference, 120):
        out.append(tuple(seq))
        states.append(reference.state_dict())
    assert sum(t == 0 for t, _ in out) == 20 and all(t == 1 for t, _ in out[-60:])
    for k in (5, 30, 60):
        assert [tuple(s) for s in islice(make(states[k]), 40)] == out[k + 1:k + 41]


def test_shuffle_buffer_permutes_and_resumes_mid_drain():
    def make(state=None):
        state = state or {"draws": 0, "items": None, "upstream": {"draws": 0, "sources": [None]}}
        up = state["upstream"]
        mixture = Mixture([Counting(0, length=50, state=up["sources"][0])], [1.0], key=1, draws=up["draws"])
        return ShuffleBuffer(mixture, 8, key=9, seq_len=1, draws=state["draws"], items=state["items"])

    reference = make()
    out, states = [], []
    for seq in reference:
        out.append(int(seq[1]))
        states.append(reference.state_dict())
    assert sorted(out) == list(range(50)) and out != sorted(out)
    assert all(i <= p + 8 for p, i in enumerate(out))  # nothing leaves before it entered the buffer
    for k in (0, 20, 45):  # 45: the source is exhausted, the buffer drains
        assert [int(s[1]) for s in make(states[k])] == out[k + 1:]


def test_vectorized_uniform_equals_the_scalar_one():
    from newtonlm.data.rng import uniform, uniform_array

    counters = np.array([0, 1, 2, 77, 10**9, 2**62, 2**63 - 1])
    assert uniform_array(11, counters).tolist() == [uniform(11, int(c)) for c in counters]
