"""`model.pretrained=imagenet`: downloads through torch.hub's cache from a local HTTP server on
127.0.0.1 that this test starts (no internet here), pointed at by SETRAIN_WEIGHTS_URL, the
variable documented for mirrors. The served file is a random model in its publisher's layout."""

import hashlib
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import timm
import torch

from conftest import TINY, assert_user_error, run_cli
from setrain.errors import SetrainError
from setrain.models import build_model, list_models, released
from test_pretrained import assert_same_outputs, randomised


class ServedFiles(BaseHTTPRequestHandler):
    """GET /<name> answers the file; a server with `cut=True` announces its full length and
    sends half of it, as a dropped connection does."""

    def do_GET(self):
        content = self.server.files.get(self.path.lstrip("/"))
        if content is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content[: len(content) // 2] if self.server.cut else content)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve(monkeypatch, tmp_path):
    """serve(files, cut=False): an HTTP server on 127.0.0.1 for `files` (name -> bytes), made the
    weights mirror; TORCH_HOME in tmp_path. Returns the server's base URL."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    servers = []

    def start(files: dict[str, bytes], cut: bool = False) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), ServedFiles)
        server.files, server.cut = files, cut
        # shutdown() waits for the loop's next poll: the default half second, after each test
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        servers.append(server)
        base = f"http://127.0.0.1:{server.server_port}"
        monkeypatch.setenv(released.MIRROR_VARIABLE, base)
        return base

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def cadene_file():
    """timm's legacy_seresnet18 (Cadene's layout) with random weights: the reference and its file's bytes."""
    reference = randomised(timm.create_model("legacy_seresnet18"))
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    return reference, buffer.getvalue()


def publish(monkeypatch, content: bytes, hash_prefix: str | None = None) -> str:
    """Put a file for se_resnet18 into the table, named with `hash_prefix` (by default the
    first 8 digits of its sha256, as publishers name theirs); returns the file name."""
    name = f"seresnet18-{hash_prefix or hashlib.sha256(content).hexdigest()[:8]}.pth"
    monkeypatch.setitem(released.RELEASED, "se_resnet18", f"https://publisher.invalid/weights/{name}")
    return name


def cache(tmp_path):
    return tmp_path / "torch" / "hub" / "checkpoints"


def imagenet_se_resnet18(num_classes: int = 1000):
    return build_model({"name": "se_resnet18", "pretrained": "imagenet"}, num_classes).eval()


def test_released_weights_are_downloaded_once_checked_and_imported(serve, cadene_file, monkeypatch, tmp_path):
    reference, content = cadene_file
    name = publish(monkeypatch, content)
    base = serve({name: content})
    assert_same_outputs(reference, imagenet_se_resnet18())  # mapped and in Cadene's layout
    assert (cache(tmp_path) / name).read_bytes() == content
    assert [path.name for path in cache(tmp_path).iterdir()] == [name]

    monkeypatch.setenv(released.MIRROR_VARIABLE, base + "/gone")  # the cache alone serves it now
    model = imagenet_se_resnet18(num_classes=10)
    torch.testing.assert_close(model.conv1.weight, reference.layer0.conv1.weight, rtol=0, atol=0)


@pytest.mark.parametrize("fault", ["bad hash", "cut off"])
def test_a_file_that_fails_its_hash_is_refused_and_not_kept(fault, serve, cadene_file, monkeypatch, tmp_path):
    _, content = cadene_file
    name = publish(monkeypatch, content, hash_prefix="0badbeef" if fault == "bad hash" else None)
    base = serve({name: content}, cut=fault == "cut off")
    message = (
        f"The file downloaded from {base}/{name} does not have its published sha256 "
        r"\([0-9a-f]{8}\.\.\.\): it was cut off or is corrupt, and nothing was kept; run again, or "
        f"download {base}/{name} yourself and set model.pretrained=<that file>."
    )
    with pytest.raises(SetrainError, match=message):
        imagenet_se_resnet18()
    assert list(cache(tmp_path).iterdir()) == []  # no half file, no .partial


def test_a_server_that_does_not_answer_is_one_sentence(serve, cadene_file, monkeypatch, tmp_path):
    name = publish(monkeypatch, cadene_file[1])
    base = serve({})
    missing = rf"Could not download {base}/{name} \(HTTP Error 404: Not Found\); check the connection"
    with pytest.raises(SetrainError, match=missing):
        imagenet_se_resnet18()
    refused = rf"Could not download http://127.0.0.1:1/{name} \(\[Errno 111\] Connection refused\);"
    monkeypatch.setenv(released.MIRROR_VARIABLE, "http://127.0.0.1:1")
    with pytest.raises(SetrainError, match=refused + r".*or download .* yourself and set model.pretrained=<that file>\.$"):
        imagenet_se_resnet18()
    assert list(cache(tmp_path).iterdir()) == []


def test_a_model_without_released_weights_lists_those_with_them():
    with pytest.raises(SetrainError, match=r"Model resnet20 has no released ImageNet weights; "
                       r"model.pretrained=imagenet works for se_resnet50, .*, resnext50_32x4d; for another"):
        build_model({"name": "resnet20", "pretrained": "imagenet"}, 10)


def test_every_released_file_is_a_registered_model_s_named_with_its_hash():
    assert set(released.RELEASED) <= set(list_models())
    for url in released.RELEASED.values():
        assert url.startswith("https://") and torch.hub.HASH_REGEX.search(url.rsplit("/", 1)[1]), url


@pytest.mark.slow
def test_cli_offline_is_one_line_and_leaves_no_run_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(released.MIRROR_VARIABLE, "http://127.0.0.1:1")  # nothing listens there
    run_dir = tmp_path / "run"
    result = run_cli(*TINY, "model=resnet18", "model.pretrained=imagenet", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_user_error(result, "setrain: error: Could not download http://127.0.0.1:1/resnet18-f37072fd.pth (")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not run_dir.exists()
    assert not cache(tmp_path).exists() or list(cache(tmp_path).iterdir()) == []
