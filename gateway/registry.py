"""Model registry: what each model is (price, region, context window, capabilities) and who serves it.

Why: routing and policy choose among models by metadata (region for data residency, context
window for long prompts, capabilities), and pricing must come from the same place that says
the model exists, so a model can never be served without a price. `as_adapter()` exposes the
whole registry as one `Adapter`, so the gateway can dispatch by model without knowing how
many upstreams there are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from domain.pricing import DEFAULT_PRICES, Price
from gateway.adapters import Adapter, Completion, SimulatedAdapter
from gateway.models import Message

# Capability names used by the registry and routing; free-form strings are allowed too.
CHAT = "chat"
STREAMING = "streaming"
LONG_CONTEXT = "long_context"
TOOLS = "tools"
JSON_MODE = "json_mode"


@dataclass(frozen=True)
class ModelInfo:
    """One servable model and the facts routing and charging need about it."""

    name: str
    adapter_name: str
    region: str
    context_window: int
    capabilities: frozenset[str]
    price: Price

    def __post_init__(self) -> None:
        if not self.name or not self.adapter_name or not self.region:
            raise ValueError("a model needs a name, an adapter_name and a region")
        if self.context_window < 1:
            raise ValueError(f"model {self.name!r}: context_window must be positive")
        if self.price.model != self.name:
            raise ValueError(f"model {self.name!r} has the price of {self.price.model!r}")


class UnknownModel(KeyError):
    """No model of that name is registered."""


class Registry:
    """Models by name and adapters by name; checked at construction so lookups cannot fail later."""

    def __init__(self, models: Iterable[ModelInfo], adapters: Mapping[str, Adapter]) -> None:
        self._adapters: dict[str, Adapter] = dict(adapters)
        self._models: dict[str, ModelInfo] = {}
        for info in models:
            if info.name in self._models:
                raise ValueError(f"model {info.name!r} is registered twice")
            adapter = self._adapters.get(info.adapter_name)
            if adapter is None:
                raise ValueError(f"model {info.name!r} names adapter {info.adapter_name!r}, which is not registered")
            if info.name not in adapter.models:
                raise ValueError(f"adapter {info.adapter_name!r} does not serve model {info.name!r}")
            self._models[info.name] = info

    def get(self, name: str) -> ModelInfo:
        info = self._models.get(name)
        if info is None:
            raise UnknownModel(name)
        return info

    def lookup(self, name: str) -> ModelInfo | None:
        return self._models.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def adapter(self, adapter_name: str) -> Adapter:
        return self._adapters[adapter_name]

    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    def adapter_for(self, model: str) -> Adapter:
        return self._adapters[self.get(model).adapter_name]

    def models(self, *, region: str | None = None, capabilities: Iterable[str] = ()) -> tuple[ModelInfo, ...]:
        """All models, or those in `region` having every capability asked for, in registration order."""
        need = frozenset(capabilities)
        return tuple(
            m for m in self._models.values() if (region is None or m.region == region) and need <= m.capabilities
        )

    def names(self) -> tuple[str, ...]:
        return tuple(self._models)

    def prices(self) -> dict[str, Price]:
        """Price per model, in the shape `create_app(prices=...)` takes."""
        return {name: info.price for name, info in self._models.items()}

    def extended(self, models: Iterable[ModelInfo], adapters: Mapping[str, Adapter]) -> Registry:
        """A new registry with more models and adapters (e.g. an upstream added to the default)."""
        return Registry([*self._models.values(), *models], {**self._adapters, **adapters})

    def as_adapter(self) -> RegistryAdapter:
        return RegistryAdapter(self)

    async def close(self) -> None:
        """Close every adapter that holds resources (HTTP pools); call on gateway shutdown."""
        for adapter in self._adapters.values():
            close = getattr(adapter, "close", None)
            if close is not None:
                await close()


class RegistryAdapter:
    """One `Adapter` over all registered models, dispatching each call to the model's adapter."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.models: tuple[str, ...] = registry.names()

    async def complete(self, model: str, messages: list[Message], max_tokens: int | None = None) -> Completion:
        return await self.registry.adapter_for(model).complete(model, messages, max_tokens)

    def stream(self, model: str, messages: list[Message], max_tokens: int | None = None) -> AsyncIterator[str]:
        return self.registry.adapter_for(model).stream(model, messages, max_tokens)

    def usage(self, model: str, messages: list[Message], text: str, max_tokens: int | None = None) -> Completion:
        return self.registry.adapter_for(model).usage(model, messages, text, max_tokens)

    async def close(self) -> None:
        await self.registry.close()


SIMULATED = "simulated"


def default_registry(chunk_latency_s: float = 0.0, prices: Mapping[str, Price] = DEFAULT_PRICES) -> Registry:
    """The simulated models the demo and tests run on; no network."""
    return Registry(
        [
            ModelInfo("sim-small", SIMULATED, "eu-west", 16_384, frozenset({CHAT, STREAMING}), prices["sim-small"]),
            ModelInfo(
                "sim-large",
                SIMULATED,
                "us-east",
                128_000,
                frozenset({CHAT, STREAMING, LONG_CONTEXT}),
                prices["sim-large"],
            ),
        ],
        {SIMULATED: SimulatedAdapter(chunk_latency_s=chunk_latency_s)},
    )


if TYPE_CHECKING:

    def _is_an_adapter(a: RegistryAdapter) -> Adapter:
        return a  # mypy proves the class satisfies the Adapter protocol
