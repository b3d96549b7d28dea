"""benchmarks/load/profile.py: py-spy collapsed stacks summed into the request path's rooms."""
from benchmarks.load.profile import main, read, report

RAW = """\
thread (0x1): deltaserve-forward_0;_worker (thread.py:80);ModelRunner.execute (model_runner.py:95);DeltaLinear.forward (linear.py:200);Linear.forward (linear.py:125) 60
thread (0x1): deltaserve-forward_0;_worker (thread.py:80);DeltaLinear.forward (linear.py:210);add_lora (__init__.py:80);cpu_add_lora (lora.py:20) 25
thread (0x1): deltaserve-forward_0;_worker (thread.py:80);DeltaLinear.forward (linear.py:207) 5
thread (0x1): deltaserve-forward_0;_worker (thread.py:80);LlamaAttention.forward (modeling_llama.py:3);paged_attention (attention.py:150) 10
thread (0x2): MainThread;BaseEventLoop.run_forever (base_events.py:1);Handle._run (events.py:2);Engine._loop (engine.py:3);Engine._emit (engine.py:4) 3
thread (0x2): MainThread;BaseEventLoop.run_forever (base_events.py:1);BaseEventLoop._run_once (base_events.py:2) 7
thread (0x2): MainThread;main (cli.py:1);build_app (app.py:2) 40
garbage line without a count
"""


def test_samples_go_to_the_deepest_bucket_by_thread():
    p = read(RAW.splitlines())
    assert p.total == 150
    assert p.threads == {"deltaserve-forward": 100, "MainThread": 50}
    assert p.forward == {"base matmuls (nn.Linear)": 60, "delta op: add_lora": 25,
                         "wrapper Python (DeltaLinear/DeltaNorm/adapters)": 5, "attention": 10}
    assert p.loop == {"engine: emit (detokenize, deliver, stats)": 3, "event loop: select / callbacks": 7}
    text = report(p)
    assert "60.0%  base matmuls" in text and "25.0%  delta op: add_lora" in text
    assert "event loop (10 samples = 6.7% of all)" in text


def test_cli(tmp_path, capsys):
    path = tmp_path / "prof.txt"
    path.write_text(RAW)
    assert main([str(path)]) == 0
    assert "150 samples" in capsys.readouterr().out
    assert main([]) == 2
    assert report(read([])) == "no samples"
