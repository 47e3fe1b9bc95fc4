"""Priority tiers: each tier is one Celery queue served by its own worker pool."""

from django.db import models


class Tier(models.TextChoices):
    CRITICAL = "critical", "Critical"
    STANDARD = "standard", "Standard"
    BATCH = "batch", "Batch"

    @property
    def queue(self) -> str:
        """The Celery queue that carries this tier's runs."""
        return self.value


DEFAULT_SLA_SECONDS: dict[Tier, float] = {
    Tier.CRITICAL: 5.0,
    Tier.STANDARD: 60.0,
    Tier.BATCH: 4 * 3600.0,
}
