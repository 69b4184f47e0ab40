"""safeanchor.logs: the console (`setup`: plain lines on stdout, once, rank 0 only), a block's
file (`to_file`), and the training loop's progress through its module logger."""

from __future__ import annotations

import logging

from tiny import CALIB, tiny_lora, toy_tokenizer

from safeanchor import logs
from safeanchor.train.loop import TrainConfig, train_examples

log = logging.getLogger("safeanchor.some.module")  # any module's logger under "safeanchor"


def test_setup_prints_the_bare_message_once(capsys):
    logs.setup()
    log.info("[run] hello")
    assert capsys.readouterr().out == "[run] hello\n"
    logs.setup()  # a second call replaces the handler: still one line per record
    log.info("[run] again")
    log.debug("not shown at INFO")
    assert capsys.readouterr().out == "[run] again\n"
    assert len(logging.getLogger("safeanchor").handlers) == 1


def test_setup_does_not_reach_the_root_handlers(capsys):
    """A host's root handler (Ray Train's worker console, a notebook's) would print each line
    a second time: setup() stops the propagation."""
    root = logging.getLogger()
    extra = logging.StreamHandler()  # stderr
    root.addHandler(extra)
    try:
        logs.setup()
        log.info("once")
    finally:
        root.removeHandler(extra)
    out = capsys.readouterr()
    assert out.out == "once\n" and "once" not in out.err


def test_other_ranks_print_nothing(capsys, monkeypatch):
    import torch.distributed as dist

    # outside a process group the launcher's RANK decides (an earlier test in this process may
    # have left a one-process group initialised, whose rank would be 0)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    logs.setup()
    monkeypatch.setenv("RANK", "1")
    log.info("rank 1 says")
    monkeypatch.setenv("RANK", "0")
    log.info("rank 0 says")
    assert capsys.readouterr().out == "rank 0 says\n"


def test_warnings_print_too(capsys):
    logs.setup()
    log.warning("[align] warning: look")
    assert capsys.readouterr().out == "[align] warning: look\n"


def test_to_file_writes_the_block_and_restores_the_handlers(tmp_path, capsys):
    console = logs.setup()
    path = tmp_path / "logs" / "cell.log"
    for attempt in ("first", "second"):  # appends
        with logs.to_file(path):
            log.info(f"=== {attempt} ===")
            log.info("line")
    log.info("after the block")
    assert path.read_text() == "=== first ===\nline\n=== second ===\nline\n"
    assert capsys.readouterr().out == "after the block\n"  # the file alone during the block
    root = logging.getLogger("safeanchor")
    assert root.handlers == [console] and root.level == logging.INFO and root.propagate is False


def test_to_file_without_setup_restores_the_library_defaults(tmp_path, caplog):
    with logs.to_file(tmp_path / "a.log"):
        log.info("in the file")
    root = logging.getLogger("safeanchor")
    assert root.handlers == [] and root.level == logging.NOTSET and root.propagate is True
    assert (tmp_path / "a.log").read_text() == "in the file\n"
    caplog.set_level(logging.INFO, logger="safeanchor")
    log.info("seen by caplog")
    assert caplog.messages == ["seen by caplog"]


def test_without_setup_info_is_silent_and_reset_undoes_setup(capsys, caplog):
    log.info("nobody configured logging")  # a library: INFO goes nowhere by default
    assert capsys.readouterr().out == ""
    logs.setup()
    logs.reset()
    log.info("after reset")
    assert capsys.readouterr().out == ""
    caplog.set_level(logging.INFO, logger="safeanchor")
    log.info("propagates again")
    assert caplog.messages == ["propagates again"]


def test_quiet_drops_info_of_a_logger_for_a_block(capsys):
    logs.setup()
    with logs.quiet("safeanchor.some"):
        log.info("dropped")
        log.warning("kept")
    log.info("back")
    assert capsys.readouterr().out == "kept\nback\n"


def test_training_loop_logs_its_progress_through_its_module_logger(caplog):
    caplog.set_level(logging.INFO, logger="safeanchor")
    tok = toy_tokenizer(CALIB)
    cfg = TrainConfig(lr=1e-3, max_steps=2, batch_size=2, max_length=48, warmup_ratio=0.0, log_every=1)
    stats = train_examples(tiny_lora(tok), tok, CALIB, cfg, 0, tag="domain")
    assert stats["steps"] == 2
    lines = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    progress = [m for name, level, m in lines if name == "safeanchor.train.loop" and level == logging.INFO]
    assert len(progress) == 2, lines
    assert progress[0].startswith("  [domain] step 1/2 loss ") and progress[1].startswith("  [domain] step 2/2 loss ")
