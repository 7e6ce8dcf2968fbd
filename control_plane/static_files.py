"""Static files served by WhiteNoise (production mode, no CDN), without WhiteNoise's one cost under ASGI.

WhiteNoise's middleware is sync-only. A single sync middleware makes Django adapt the whole chain: every
request, API calls and long polls included, then hops to a thread and back to reach its async view. This
subclass is async: a static file is served from a worker thread, anything else goes straight on.
"""

from __future__ import annotations

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from whitenoise.middleware import WhiteNoiseMiddleware


class AsyncWhiteNoiseMiddleware(WhiteNoiseMiddleware):
    sync_capable = False
    async_capable = True

    def __init__(self, get_response=None, **kwargs):
        super().__init__(get_response, **kwargs)
        if not iscoroutinefunction(get_response):
            raise TypeError("AsyncWhiteNoiseMiddleware needs an async handler chain")
        markcoroutinefunction(self)

    async def __call__(self, request):
        static_file = self.find_file(request.path_info) if self.autorefresh else self.files.get(request.path_info)
        if static_file is not None:
            return await sync_to_async(self.serve, thread_sensitive=False)(static_file, request)
        return await self.get_response(request)
