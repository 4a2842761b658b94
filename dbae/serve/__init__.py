"""``dbae serve``: a local real-time image-editing studio over the deployment runners.

FastAPI on uvicorn, one page of plain HTML + JS + CSS shipped in ``static/`` (no build step,
nothing fetched from elsewhere), a websocket per page (:mod:`.protocol`). The model loads
once per server; every connection's renders go through one :class:`~.render.Renderer`
(any runner of :mod:`dbae.export.registry`, batching the decodes of connections that are
ready together); each connection keeps its images' latents and its newest request only
(:mod:`.session`). The sliders move z as ``dbae manipulate`` does (:mod:`.latents`).
Face models can align uploads to the FFHQ framing (:mod:`.align`, optional OpenCV).

Needs the ``serve`` extra (``pip install 'dbae[serve]'``): fastapi, uvicorn, websockets.
"""
