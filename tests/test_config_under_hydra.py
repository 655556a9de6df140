"""`load_pipeline_config` called from inside a user's own `@hydra.main` app.

The user's job has its own config folder and primary `config.yaml`; our call must compose the
project's `conf/`, not the user's search path, and must leave the user's Hydra state (GlobalHydra,
`HydraConfig`, the user's config) working after it returns. Real subprocesses, no mocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from hades_gpu.config import conf_dir, load_pipeline_config

ROOT = Path(__file__).resolve().parent.parent

USER_APP = textwrap.dedent(
    """
    import hydra
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from hades_gpu.config import load_pipeline_config, register_configs

    if REGISTER:  # as hades_gpu.cli does before its @hydra.main over conf/
        register_configs()


    @hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base="1.3")
    def main(cfg: DictConfig) -> None:
        first = load_pipeline_config(profile="low_memory")
        print(f"PROFILE={first.profile.name}")
        print(f"WORKERS={first.profile.num_workers}")
        again = load_pipeline_config(profile="balanced", overrides=["chunking.chunk_tokens=128"])
        print(f"AGAIN={again.profile.name}")
        print(f"CHUNK={again.chunking.chunk_tokens}")
        print(f"OUTPUT_DIR={HydraConfig.get().runtime.output_dir}")
        print(f"JOB_NAME={HydraConfig.get().job.name}")
        print(f"FOO={cfg.get('foo')}")
        # the user's own GlobalHydra is back: composing the user's primary config still works
        print(f"INITIALIZED={GlobalHydra.instance().is_initialized()}")
        if "foo" in cfg:
            print(f"RECOMPOSED_FOO={compose(config_name=CONFIG_NAME, overrides=['foo=7']).foo}")
        else:  # an app over our own conf/, as hades_gpu.cli's are
            print(f"RECOMPOSED_SHARD={compose(config_name=CONFIG_NAME, overrides=['shard=s9']).shard}")


    if __name__ == "__main__":
        main()
    """
)


def _run_user_app(tmp_path: Path, config_path: str, config_name: str,
                  register: bool = False) -> subprocess.CompletedProcess[str]:
    app = tmp_path / "user_app.py"
    app.write_text(f"CONFIG_PATH = {config_path!r}\nCONFIG_NAME = {config_name!r}\nREGISTER = {register!r}\n"
                   + USER_APP)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("HADES_GPU_CONF_DIR", None)
    return subprocess.run([sys.executable, str(app), "hydra.run.dir=" + str(tmp_path / "run")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def _parse(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


# "config": the user's primary config has our name (was: "Could not override 'profile'");
# "main": it has another (was: "Cannot find primary config 'config'").
@pytest.mark.parametrize("user_config_name", ["config", "main"])
def test_load_pipeline_config_inside_a_users_hydra_app(tmp_path: Path, user_config_name: str) -> None:
    (tmp_path / "user_conf").mkdir()
    (tmp_path / "user_conf" / f"{user_config_name}.yaml").write_text("foo: 1\nbar: user\n")
    proc = _run_user_app(tmp_path, "user_conf", user_config_name)
    lines = _parse(proc)
    assert lines["PROFILE"] == "low_memory"
    assert lines["WORKERS"] == str(load_pipeline_config(profile="low_memory").profile.num_workers)
    assert lines["AGAIN"] == "balanced"
    assert lines["CHUNK"] == "128"
    assert Path(lines["OUTPUT_DIR"]) == tmp_path / "run"
    assert lines["JOB_NAME"] == "user_app"
    assert lines["FOO"] == "1"
    assert lines["INITIALIZED"] == "True"
    assert lines["RECOMPOSED_FOO"] == "7"


def test_load_pipeline_config_inside_a_hydra_app_over_our_own_conf(tmp_path: Path) -> None:
    """The layout of hades_gpu.cli's apps: `@hydra.main` over `conf/`, then config functions."""
    lines = _parse(_run_user_app(tmp_path, str(conf_dir()), "config", register=True))
    assert lines["PROFILE"] == "low_memory"
    assert lines["CHUNK"] == "128"
    assert Path(lines["OUTPUT_DIR"]) == tmp_path / "run"
    assert lines["INITIALIZED"] == "True"
    assert lines["RECOMPOSED_SHARD"] == "s9"


def test_load_pipeline_config_outside_hydra_twice_leaves_no_global_state() -> None:
    assert not GlobalHydra.instance().is_initialized()
    first = load_pipeline_config(profile="low_memory")
    second = load_pipeline_config(profile="low_memory")
    assert first == second
    assert first.profile.name == "low_memory"
    assert not GlobalHydra.instance().is_initialized()
