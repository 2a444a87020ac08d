"""Request-scoped access to the service's parts (set up by ``service.app``'s lifespan) for FastAPI routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    # async on purpose: FastAPI runs a plain ``def`` dependency on its thread pool, a thread hop per request.
    state: ServiceState = request.app.state.service
    return state


State = Annotated[ServiceState, Depends(get_state)]
