"""`Engine.from_args`: a pool's `args` reach the engine in one place, so a serving knob added
to AppArgs needs no other wiring (and a knob the engine does not take fails here, not at serve time)."""

from __future__ import annotations

import inspect

from deltafleet.serving.config import AppArgs
from deltafleet.serving.engine import APP_ONLY_ARGS, Engine


def test_every_app_arg_is_an_engine_parameter_or_the_applications_own():
    engine_params = set(inspect.signature(Engine.__init__).parameters) - {"self"}
    fields = set(AppArgs.model_fields)
    assert APP_ONLY_ARGS <= fields, f"not AppArgs fields: {sorted(APP_ONLY_ARGS - fields)}"
    assert not APP_ONLY_ARGS & engine_params, "an application-only arg is also an Engine parameter"
    missing = sorted(fields - APP_ONLY_ARGS - engine_params)
    assert not missing, f"AppArgs fields no Engine parameter takes (add one, or list them in APP_ONLY_ARGS): {missing}"


def test_from_args_passes_every_engine_arg_and_the_extras(monkeypatch):
    got = {}
    monkeypatch.setattr(Engine, "__init__", lambda self, **kw: got.update(kw))
    args = AppArgs(pool="p", base_model="/m/base", kv_block_size=8, max_step_tokens=64, decode_mode="static",
                   prefix_caching=False, auth="none", max_queue_per_tenant=3)

    def on_step(stats):
        return None

    Engine.from_args(args, on_step=on_step)
    want = {k: v for k, v in args.model_dump().items() if k not in APP_ONLY_ARGS}
    assert got == {**want, "on_step": on_step}
    assert got["kv_block_size"] == 8 and got["decode_mode"] == "static" and got["max_queue_per_tenant"] == 3
