"""`unetpp models` against a real server of three models (nuclei, cells with L1 and L2 only, a
broken one): list, unload, load, reload one and all; one-line errors and predict's exit codes."""

from __future__ import annotations

import pytest

from tests.helpers import free_port, model_states, post_image, settings, start, stop
from unetpp.cli import main


def models(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    """Run `unetpp models ARGV`: (exit code, stdout lines, stderr lines)."""
    code = main(["models", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_list_shows_every_model_its_state_and_graphs(several_models, capsys):
    code, out, err = models(capsys, "list", "--server", several_models.url)
    assert code == 0 and not err
    rows = {line.split()[0]: line for line in out}
    assert set(rows) == {"nuclei", "cells", "broken"}
    assert rows["cells"].split()[1] == "ready" and rows["cells"].endswith("graphs L1,L2")
    assert "graphs L1,L2,L3,L4" in rows["nuclei"]
    assert rows["broken"].split()[1] == "failed" and "L2.onnx" in rows["broken"]


def test_unload_then_load_one_model_while_the_others_serve(several_models, capsys):
    code, out, _ = models(capsys, "unload", "cells", "--server", several_models.url)
    assert (code, out) == (0, ["cells: UNAVAILABLE"])
    assert model_states(several_models)["cells"] == "unloaded"
    assert post_image(several_models, "/v1/models/cells/segment").status_code == 503
    assert post_image(several_models, "/v1/models/nuclei/segment").status_code == 200

    code, out, _ = models(capsys, "load", "cells", "--server", several_models.url)
    assert code == 0 and len(out) == 1 and out[0].startswith("cells: READY (version ")
    assert post_image(several_models, "/v1/models/cells/segment").status_code == 200


def test_reload_one_model(several_models, capsys):
    before = several_models.client.get("/v1/models/nuclei").json()["loaded_at"]
    code, out, _ = models(capsys, "reload", "nuclei", "--server", several_models.url)
    assert code == 0 and out[0].startswith("nuclei: READY")
    assert several_models.client.get("/v1/models/nuclei").json()["loaded_at"] > before


def test_reload_all_fails_on_one_line_when_a_model_cannot_load(several_models, capsys):
    code, out, err = models(capsys, "reload", "--server", several_models.url)
    assert code == 1 and not out and len(err) == 1
    assert err[0].startswith("unetpp models reload: error: 422 load_failed: ")
    assert "broken" in err[0]
    states = model_states(several_models)
    assert states["nuclei"] == states["cells"] == "ready"


def test_an_unknown_model_is_one_line_and_exit_1(several_models, capsys):
    code, out, err = models(capsys, "load", "nope", "--server", several_models.url)
    assert code == 1 and not out
    detail = "no model 'nope'; models: broken, cells, nuclei"
    assert err == [f"unetpp models load: error: 404 model_not_found: {detail}"]


def test_model_control_on_a_closed_server_is_refused(tiny_repository, capsys):
    closed = start(settings(tiny_repository))  # no key, admin not opened
    try:
        code, _, err = models(capsys, "unload", "unetpp", "--server", closed.url)
        listed, out, _ = models(capsys, "list", "--server", closed.url)
    finally:
        stop(closed)
    assert code == 1 and len(err) == 1 and "403 admin_closed" in err[0]
    assert listed == 0 and out[0].split()[:2] == ["unetpp", "*"]  # the only model: the default


def test_a_server_nobody_answers_is_exit_2(capsys):
    code, _, err = models(capsys, "list", "--server", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and len(err) == 1 and err[0].startswith("unetpp models: error: http://")


def test_load_without_a_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["models", "load", "--server", "http://127.0.0.1:1"])
    assert exit_.value.code == 2
