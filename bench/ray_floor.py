"""What Ray and Ray Train cost by themselves on this machine, before any training: the floor under
bench/overhead.py's runner figure.

    python bench/ray_floor.py

A local Ray started as `runner run` starts it (same settings), one TorchTrainer worker (2 CPUs, gloo) that imports
what the runner's worker imports (torch, transformers, accelerate, datasets) and returns, and the shutdown; timed
from interpreter start to exit, less the same imports in one plain process (which a bare script pays too). Last
line: JSON with floor_s and its parts.
"""


import json
import subprocess
import sys
import tempfile
import time

IMPORTS = "import torch, transformers, accelerate, datasets"


def train_func(config: dict) -> None:
    t = time.time()
    exec(IMPORTS)
    with open(config["out"], "w") as f:
        json.dump({"func_start": t, "func_end": time.time()}, f)


def ray_side() -> dict:
    t0 = time.time()
    import logging

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.driver import WORKER_PRIORITY, ray_settings

    ray_settings(local=True)
    t_import = time.time()
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             object_store_memory=200 * 2**20)
    t_init = time.time()
    tmp = tempfile.mkdtemp(prefix="ray-floor-")
    TorchTrainer(train_func, train_loop_config={"out": f"{tmp}/func.json"},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name="floor", storage_path=tmp,
                                      worker_runtime_env={"env_vars": dict(WORKER_PRIORITY)})).fit()
    t_fit = time.time()
    ray.shutdown()
    t_end = time.time()
    with open(f"{tmp}/func.json") as f:
        fn = json.load(f)
    return {"import_s": t_import - t0, "ray_init_s": t_init - t_import,
            "fit_to_worker_s": fn["func_start"] - t_init, "worker_imports_s": fn["func_end"] - fn["func_start"],
            "worker_end_to_fit_s": t_fit - fn["func_end"], "shutdown_s": t_end - t_fit}


def whole(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    if sys.argv[1:] == ["--ray-side"]:
        print(json.dumps(ray_side()))
        return
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--ray-side"], check=True, capture_output=True, text=True)
    ray_s = time.perf_counter() - t0
    parts = json.loads(out.stdout.strip().splitlines()[-1])
    plain_s = whole([sys.executable, "-c", IMPORTS])
    floor = ray_s - plain_s
    print("  ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    print(f"Ray + Ray Train, one worker, nothing trained: {ray_s:.1f} s; the same imports in one process "
          f"{plain_s:.1f} s; the floor {floor:.1f} s")
    print(json.dumps({"floor_s": round(floor, 2), "ray_s": round(ray_s, 2), "plain_imports_s": round(plain_s, 2),
                      **{k: round(v, 2) for k, v in parts.items()}}))


if __name__ == "__main__":
    main()
