"""``sdv2 serve``: the online mode. A browser sends camera (or video-file) frames, the server restyles them live.

    sdv2 serve                       # tiny model, CPU, dummy weights, http://127.0.0.1:7860 (conf/serve.yaml)

One module per concept:

* ``settings.py``  the ``serve:`` section of conf/serve.yaml, validated;
* ``wire.py``      JPEG in / out and the binary tag that lets a client match output frames to its input frames;
* ``protocol.py``  the JSON control messages (start, prompt, noise_scale, steps, taehv, pause, resume, stop);
* ``engine.py``    the model side: one pipeline and its chunk driver, used from one worker thread only;
* ``session.py``   one client: state, bounded inbox / outbox, counters;
* ``hub.py``       the asyncio side: messages, the loop that gives the engine every client's newest chunk at once
                   (one DiT call for all), routing of restyled frames, /api numbers;
* ``app.py``       FastAPI routes: the page, ``/ws``, MJPEG, ``/api/health``, ``/api/metrics``;
* ``main.py``      the Hydra entry point; ``background.py`` the server in a thread (tests, benchmark);
* ``client.py``    a scripted client (load test, ``experiments/bench_serve.py``);
* ``static/``      the page (HTML / JS / CSS; no build step, no CDN).
"""
