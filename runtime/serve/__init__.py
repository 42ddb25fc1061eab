"""`runtime serve`: the torch-free HTTP service (AUTOMATIC1111's /sdapi/v1, OpenAI's images route, a web page).

Layers, each usable without the one above it:
- registry.ModelRegistry: the exported folders a server offers, the loaded pipeline, model switching;
- service.GenerationService: a bounded queue, worker threads, progress, interrupt and skip (no HTTP);
- a1111_* / openai_images: request bodies -> runtime.request.GenerationRequest values, results -> responses;
- app.create_app(service, settings): the ASGI app (FastAPI) with auth, body limits and logging;
- server.serve(settings): uvicorn with a clean shutdown (`runtime serve`).
"""
