"""tests/dist_update.py with log-probs in chunks of 3 positions (model.LOGPROB_CHUNK_ELEMENTS): under DDP
or FSDP2 each chunk is checkpointed inside the (root) module's forward, and its recompute in backward must
give the same gradients as the unchunked 1-process update (test_scale.py compares them).

    torchrun --nproc_per_node 2 tests/dist_update_chunked.py OUT.pt [--fsdp]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model  # noqa: E402
from dist_update import CONFIG, main  # noqa: E402

model.LOGPROB_CHUNK_ELEMENTS = 3 * CONFIG["vocab_size"]

if __name__ == "__main__":
    main()
