"""`hayai doctor`: what this machine offers and what hayai will use."""

from __future__ import annotations

from rich.table import Table

from hayai.cli.app import app, out


@app.command()
def doctor() -> None:
    """Print torch version and build, CPU ISA, BLAS/oneDNN, threads, GPUs and the defaults hayai picks."""
    from hayai.bench.hardware import cpu_isa, describe
    from hayai.models.store import hayai_home
    from hayai.runtime import configure_threads, resolve_device, resolve_dtype

    configure_threads()
    info = describe()
    device = resolve_device("auto")
    table = Table(title="hayai doctor", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    rows = [
        ("CPU", f"{info['cpu']} ({info['cpu_cores_physical']} physical / {info['cpu_cores_logical']} logical)"),
        ("CPU capability (torch)", str(info["cpu_capability"])),
        ("ISA", ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu_isa().items())),
        ("memory", f"{info['memory_bytes'] / 1e9:.1f} GB"),
        ("python", info["python"]),
        ("torch", f"{info['torch']} ({'CUDA ' + info['torch_cuda'] if info['torch_cuda'] else 'CPU build'})"),
        ("BLAS", info["blas"]),
        ("MKL / oneDNN / OpenMP", f"{info['mkl']} / {info['onednn']} / {info['openmp']}"),
        ("threads", f"{info['threads']} intra-op, {info['interop_threads']} inter-op"
                    + (f" (OMP_NUM_THREADS={info['omp_num_threads_env']})" if info["omp_num_threads_env"] else "")),
        ("GPUs", "; ".join(f"{g['name']} {g['memory_bytes'] / 2**30:.0f} GiB (sm {g['capability']})"
                           for g in info["gpus"]) or "none"),
        ("default device / dtype", f"{device} / {str(resolve_dtype('auto', device)).replace('torch.', '')}"),
        ("model store", str(hayai_home() / "models")),
    ]
    for item, value in rows:
        table.add_row(item, value)
    out.print(table)
