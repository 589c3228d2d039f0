"""Image history pool (Shrivastava et al.; Sec. 4 of the CycleGAN paper): the discriminators see a mix of the
newest fakes and up to `size` older ones, which damps oscillation."""

from __future__ import annotations

import torch


class ImagePool:
    """Holds up to `size` generated images; `query` returns a batch of the same shape as its input.

    Until the pool is full, images are stored and returned as they are. Then each image is, with probability
    0.5, swapped with a random stored one (the stored one is returned), else returned as it is. size 0 passes
    everything through. All randomness comes from the pool's own generator, so `state_dict` captures it.
    """

    def __init__(self, size: int, seed: int):
        self.size = size
        self.images: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, C, H, W]
        if self.size == 0:
            return images
        images = images.detach()
        out = []
        for image in images:
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand((), generator=self.generator) < 0.5:
                index = int(torch.randint(len(self.images), (), generator=self.generator))
                out.append(self.images[index].clone())
                self.images[index] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)

    def state_dict(self) -> dict:
        """Stored images (on CPU), the size and the generator state."""
        return {
            "size": self.size,
            "images": [image.cpu() for image in self.images],
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        """Restore what `state_dict` returned; images are moved to `device`."""
        if state["size"] != self.size:
            raise ValueError(f"image pool of size {state['size']} cannot be loaded into a pool of size {self.size}")
        self.images = [image.to(device) for image in state["images"]]
        self.generator.set_state(state["generator"])
