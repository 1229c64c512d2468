"""Block linears are found by module type and shape, for any architecture."""

import torch
from torch import nn

from deltafleet.compress.checkpoint import empty_model
from deltafleet.compress.linears import block_linears, compressed_modules, embedding_modules


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 96)
        self.b = nn.Linear(96, 64)
        self.odd = nn.Linear(40, 64)  # in_features not packable: left whole
        self.norm = nn.LayerNorm(64)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 64)
        self.stack = nn.ModuleList([Block() for _ in range(3)])
        self.extras = nn.ModuleList([nn.Linear(64, 64)])  # a smaller list: not the blocks
        self.head = nn.Linear(64, 10)

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return self.head


def test_generic_architecture():
    names = block_linears(Toy())
    assert names == [f"stack.{i}.{n}" for i in range(3) for n in ("a", "b")]
    assert embedding_modules(Toy()) == ["emb", "head"]


def test_tied_embeddings_stay_whole():
    m = Toy()
    m.head = nn.Linear(64, 10)
    m.head.weight = m.emb.weight
    assert embedding_modules(m) == []


def test_hf_families(pair, family):
    model = empty_model(pair[0])
    names = block_linears(model)
    layers = model.config.num_hidden_layers
    assert len(names) == 7 * layers  # q k v o gate up down in every block
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in names)
    assert "lm_head" not in names and not any("embed" in n for n in names)
    assert compressed_modules(model, compress_embeddings=True)[-2:] == ["model.embed_tokens", "lm_head"]
    assert next(model.parameters()).device == torch.device("meta")
