"""Edge cases of the command line and the settings files: spellings a user types, and what each one gets."""

import io
import random
import subprocess
import sys
import warnings
from contextlib import redirect_stdout

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from llmkern import cli
from llmkern.data.config import load_config as load_data_config
from llmkern.finetune import METHODS, get_method, load_finetune_config
from llmkern.finetune.sft import SFTConfig
from llmkern.train.config import TrainConfig, describe_settings, load_config


def _settings_as_toml(printed: str) -> dict:
    """The `--settings` listing (its header line left out) read as a TOML file."""
    lines = [line for line in printed.splitlines() if line.startswith("  ")]
    return tomllib.loads("\n".join(lines))


def test_train_settings_listing_reads_back_as_a_config_file(tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["train", "--settings"]) == 0
    values = _settings_as_toml(out.getvalue())
    assert set(values) == set(TrainConfig().to_dict())
    path = tmp_path / "settings.toml"
    path.write_text("\n".join(line for line in out.getvalue().splitlines() if line.startswith("  ")))
    assert load_config(str(path)) == TrainConfig().validate()


@pytest.mark.parametrize("method", METHODS)
def test_finetune_settings_listing_is_toml_with_the_defaults(method):
    config_cls, _ = get_method(method)
    values = _settings_as_toml(describe_settings(config_cls))
    defaults = config_cls().to_dict()
    # None has no TOML spelling: such a setting is listed as a comment, and left at its default when read back
    assert values == {k: v for k, v in defaults.items() if v is not None}


def test_the_same_warning_is_said_once_when_train_validates_twice():
    steps = random.randint(2, 50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(None, [f"--max_steps={steps}", f"--warmup_steps={steps + 1}"])
        config.validate()  # as Trainer.__init__ does with load_config's config
    assert [str(w.message) for w in caught if "warmup_steps" in str(w.message)] == [(
        f"warmup_steps={steps + 1} is longer than max_steps={steps}: the run ends within its warmup, so the "
        f"learning rate never reaches lr=0.002 nor decays to min_lr (resume with a higher max_steps to go on)")]


def test_a_config_changed_after_validation_is_warned_about_again():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(None, ["--max_steps=10", "--warmup_steps=11"])
        config.warmup_steps = 12
        config.validate()
    assert sum("warmup_steps" in str(w.message) for w in caught) == 2


def test_a_python_config_is_warned_about_by_its_first_validation():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TrainConfig(max_steps=10, warmup_steps=11).validate()
    assert sum("warmup_steps" in str(w.message) for w in caught) == 1


def test_list_and_table_model_settings_can_be_given_on_the_command_line():
    layers = sorted(random.sample(range(4), 2))
    spelled = ",".join(map(str, layers))
    for text in (spelled, f"[{spelled}]", " , ".join(map(str, layers))):
        config = load_config(None, ["--preset=tiny-moe", f"--model.moe_layers={text}", "--model.n_layer=4"])
        assert config.model["moe_layers"] == layers
    config = load_config(None, ["--model.moe_layers=none"])
    assert config.model["moe_layers"] is None


def test_a_table_model_setting_from_the_command_line_is_json():
    factor = random.choice([2.0, 4.0, 8.0])
    scaling = f'{{"rope_type": "linear", "factor": {factor}}}'
    config = load_config(None, ["--preset=tiny-llama", f"--model.rope_scaling={scaling}"])
    assert config.model["rope_scaling"] == {"rope_type": "linear", "factor": factor}
    with pytest.raises(ValueError, match="model.rope_scaling.*JSON object"):
        load_config(None, ["--model.rope_scaling=factor=2"])


def test_a_list_model_setting_with_a_wrong_item_names_the_setting():
    with pytest.raises(ValueError, match="'model.moe_layers' in command line must be an integer, got 'x'"):
        load_config(None, ["--model.moe_layers=1,x"])


def test_a_misspelled_model_setting_gets_a_suggestion():
    with pytest.raises(ValueError, match="unknown model setting 'model.n_layr' in command line; did you mean "
                                         "'model.n_layer'"):
        load_config(None, ["--model.n_layr=2"])


def test_a_misspelled_data_setting_gets_a_suggestion():
    with pytest.raises(ValueError, match="unknown key 'quality.min_wrds'; did you mean 'min_words'"):
        load_data_config(None, ["--quality.min_wrds=3"])
    with pytest.raises(ValueError, match="unknown key 'qualty'; did you mean 'quality'"):
        load_data_config(None, ["--qualty.min_words=3"])


def test_a_data_config_file_that_does_not_parse_is_named(tmp_path):
    path = tmp_path / "prepare.toml"
    path.write_text("[quality\nmin_words = 3\n")
    with pytest.raises(ValueError, match=f"cannot parse config file '{path}'"):
        load_data_config(str(path))


def test_lora_targets_spelled_with_spaces_are_the_same_setting():
    spaced = load_finetune_config(SFTConfig, None, ["--lora_rank=4", "--lora_targets= qkv, fc ,"])
    tight = load_finetune_config(SFTConfig, None, ["--lora_rank=4", "--lora_targets=qkv,fc"])
    assert spaced.lora_targets == tight.lora_targets == "qkv,fc"


def test_ctrl_c_outside_training_is_one_line_and_status_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_info", interrupted)
    assert cli.main(["info"]) == 130
    err = capsys.readouterr().err
    assert err == "llmkern info: interrupted\n"


def test_a_closed_stdout_exits_141_and_another_broken_pipe_is_an_error(monkeypatch, capsys):
    """`llmkern train --settings | head`: the reader of stdout has gone, status 141 and no traceback. A broken
    pipe of anything else (a worker process's, say) while stdout is open is an error to show: it exited 141
    silently, as if the output had merely been cut short."""
    def worker_gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_cmd_info", worker_gone)
    with pytest.raises(BrokenPipeError):  # stdout no file (pytest's capture): not the pipe that broke
        cli.main(["info"])
    capsys.readouterr()
    code = ("import sys; from llmkern import cli\n"
            "def worker_gone(args): raise BrokenPipeError(32, 'Broken pipe')\n"
            "cli._cmd_info = worker_gone; sys.exit(cli.main(['info']))")
    stdout_open = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert stdout_open.returncode == 1 and "BrokenPipeError" in stdout_open.stderr

    with subprocess.Popen([sys.executable, "-m", "llmkern", "train", "--settings"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as reader_gone:
        reader_gone.stdout.close()  # before it writes: its print finds the reader gone
        assert reader_gone.wait(timeout=120) == 141
        assert reader_gone.stderr.read() == b""


def test_python_dash_m_and_the_entry_point_agree():
    args = ["train", "--max_stepz=3"]
    by_module = subprocess.run([sys.executable, "-m", "llmkern", *args], capture_output=True, text=True, check=False)
    by_entry = subprocess.run([sys.executable, "-c", "import sys; from llmkern.cli import main; sys.exit(main())",
                               *args], capture_output=True, text=True, check=False)
    assert by_module.returncode == by_entry.returncode == 2
    assert by_module.stderr == by_entry.stderr
    assert "did you mean 'max_steps'" in by_module.stderr and "Traceback" not in by_module.stderr


def test_betas_as_the_settings_listing_spells_them_are_read_on_the_command_line():
    b2 = round(random.uniform(0.9, 0.999), 3)
    for text in (f"[0.9, {b2}]", f"0.9,{b2}", f" 0.9 , {b2} "):
        assert load_config(None, [f"--betas={text}"]).betas == (0.9, b2)


def test_llmkern_backend_reaches_a_training_runs_model_and_optimizer(monkeypatch):
    """TrainConfig's backend "auto" is llmkern's default, which LLMKERN_BACKEND sets (it was passed on as "auto",
    and the variable never reached `llmkern train`); a bad value is an error naming the variable."""
    from llmkern.train.config import TrainConfig

    monkeypatch.setenv("LLMKERN_BACKEND", "torch")
    assert TrainConfig().op_backend == "torch" and TrainConfig(backend="triton").op_backend == "triton"
    monkeypatch.setenv("LLMKERN_BACKEND", "trition")
    with pytest.raises(ValueError, match="LLMKERN_BACKEND"):
        _ = TrainConfig().op_backend
    monkeypatch.delenv("LLMKERN_BACKEND")
    assert TrainConfig().op_backend == "auto"
