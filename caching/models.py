from django.db import models


class MemoizedFunction(models.Model):
    """A function memoized in code (@memoize), listed so that operators can follow and clear it.

    Rows follow the code's registry (caching.sync); the counters live in Redis, not here.
    """

    name = models.CharField(max_length=200, unique=True, help_text="module.qualname, or the name given to @memoize.")
    version = models.CharField(
        max_length=50, help_text="Declared in code; a new version leaves the old entries unreachable."
    )
    registered = models.BooleanField(default=True, help_text="Whether the code still declares this function.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name
