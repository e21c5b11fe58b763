"""Networks that a module carries but never trains: a teacher, a generalist, ensemble members.

:class:`FrozenNetworks` freezes them once, by construction, for every module that holds one: each
registered network stays in eval mode whatever ``train()`` is called with (Lightning puts submodules
back in train mode after validation), its parameters have ``requires_grad=False`` so no optimizer can
hold them, and its weights are left out of the module's checkpoints: they are reloaded from their own
files, and copying them into every checkpoint would multiply disk use by their size.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class FrozenNetworks:
    """Mixin for a LightningModule that carries frozen networks; list it before the LightningModule base.

    Example:
        >>> import lightning as L
        >>> class Student(FrozenNetworks, L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(2, 2)
        ...         self.freeze("teacher", nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
        >>> s = Student().train()
        >>> s.teacher.training, s.net.training, any(p.requires_grad for p in s.teacher.parameters())
        (False, True, False)
        >>> checkpoint = {"state_dict": s.state_dict()}
        >>> s.on_save_checkpoint(checkpoint)
        >>> sorted(checkpoint["state_dict"])
        ['net.bias', 'net.weight']
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._frozen_names: list[str] = []

    def freeze(self, name: str, net: nn.Module) -> nn.Module:
        """Attach ``net`` as attribute ``name``, frozen: eval mode, no gradients, kept out of checkpoints."""
        net.eval().requires_grad_(False)
        setattr(self, name, net)
        if name not in self._frozen_names:
            self._frozen_names.append(name)
        return net

    def frozen_networks(self) -> dict[str, nn.Module]:
        """The frozen networks attached so far, by attribute name."""
        return {name: getattr(self, name) for name in self._frozen_names}

    def train(self, mode: bool = True) -> Any:
        super().train(mode)  # type: ignore[misc]
        for net in self.frozen_networks().values():
            net.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        state = checkpoint["state_dict"]
        prefixes = tuple(f"{name}." for name in self._frozen_names)
        for key in [k for k in state if k.startswith(prefixes)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Put the frozen networks' current weights back, so that strict loading still checks every
        # trained key.
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        state = checkpoint["state_dict"]
        for name, net in self.frozen_networks().items():
            for key, value in net.state_dict().items():
                state.setdefault(f"{name}.{key}", value)
