"""Language-model utilities shared by editing, influence and alignment: chat encoding and batching, the frozen-prefix cache, model inputs and per-example losses."""
