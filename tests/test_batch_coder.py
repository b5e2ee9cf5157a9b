"""BatchCoder: batches round-trip whole, and their size is estimated from one row."""

import pickle

from apache_beam.coders import registry

from tests.scoring_fixtures import make_decisions
from transforms.batch_coder import BatchCoder, RowBatch


def test_a_batch_of_decision_rows_round_trips(blueprint):
    batch = [(e.decision_id, e) for e in make_decisions(blueprint, 5)]
    coder = BatchCoder()
    assert coder.decode(coder.encode(batch)) == batch


def test_the_size_of_a_batch_is_its_length_times_its_first_rows_size(blueprint):
    batch = [(e.decision_id, e) for e in make_decisions(blueprint, 5)]
    first = len(pickle.dumps(batch[0], pickle.HIGHEST_PROTOCOL))
    assert BatchCoder().estimate_size(batch) == 5 * first
    assert BatchCoder().estimate_size([]) == 1


def test_row_batches_are_coded_with_the_batch_coder():
    assert registry.get_coder(RowBatch) == BatchCoder()
