"""Shared pieces of the demo page's tests: a tiny saved model, a demo split, a served page on a free local port."""

import contextlib
import os
import socket
import time

import torch

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported anywhere: no usage reports


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def save_tiny_model(folder, clip_config, processor, seed: int = 0):
    """A randomly initialised tiny EntityCLIP and its processor, saved as `finetune.py` saves `best/`."""
    from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

    torch.manual_seed(seed)
    EntityCLIPModel(EntityCLIPConfig(clip_config=clip_config)).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_split(root):
    """The package's demo dataset, small: 8 entities x 4 captions; its test split has 8 images and captions."""
    from entityclip_hf.data import make_demo_dataset

    return make_demo_dataset(root, num_entities=8, captions_per_entity=4)


@contextlib.contextmanager
def served(argv, max_upload: str = "10mb"):
    """Serve the page of `entityclip-demo ARGV` on 127.0.0.1 at a free port; yields (url, loader); closed after."""
    from entityclip_hf.demo_app import _explainer, _parser, build_demo, prepare

    args = _parser().parse_args(argv)
    model, _, loader, facts = prepare(args)
    demo = build_demo(loader.start(), facts, hasattr(model, "match_probability"), _explainer(args))
    assert loader.done.wait(120), "the gallery was not prepared in 2 minutes"
    assert loader.error is None, loader.error
    port = free_port()
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, max_file_size=max_upload
    )
    try:
        yield f"http://127.0.0.1:{port}/", loader
    finally:
        demo.close()


def wait_for_http(url: str, timeout: float, process=None) -> None:
    """Wait until `url` answers (or the process serving it exits)."""
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s")
