"""Per-example gradients, chunked."""

from jattr.grads.per_example import apply_chunks
from jattr.grads.per_example import check_chunk_size
from jattr.grads.per_example import count_nonfinite
from jattr.grads.per_example import flatten_per_example
from jattr.grads.per_example import in_trace
from jattr.grads.per_example import loop_chunks
from jattr.grads.per_example import map_chunks
from jattr.grads.per_example import per_example_flat_grads
from jattr.grads.per_example import per_example_grads
from jattr.grads.per_example import num_examples
from jattr.grads.per_example import sum_chunks
from jattr.grads.per_example import to_chunks
