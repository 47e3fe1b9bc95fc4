"""The operators' view of memoized functions: how well each is cached, and clearing its entries."""

import redis
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.template.defaultfilters import pluralize

from caching.memoize import MemoStats, memo_clear, memo_stats
from caching.models import MemoizedFunction


class MemoizedFunctionChangeList(ChangeList):
    """Gives each function on the page its statistics (`function.stats`), read from Redis in one round trip."""

    def get_results(self, request) -> None:
        super().get_results(request)
        functions = list(self.result_list)
        try:
            stats = memo_stats([function.name for function in functions])
        except redis.RedisError:
            messages.warning(request, "Redis does not answer: the statistics below are not the real ones.")
            stats = {function.name: MemoStats() for function in functions}
        for function in functions:
            function.stats = stats[function.name]


def _stats(function: MemoizedFunction) -> MemoStats:
    """The statistics MemoizedFunctionChangeList attached, or (for a function shown elsewhere) its own."""
    stats = getattr(function, "stats", None)
    if stats is None:
        stats = memo_stats([function.name])[function.name]
    return stats


@admin.register(MemoizedFunction)
class MemoizedFunctionAdmin(admin.ModelAdmin):
    """Memoized functions come from code: read-only, except for clearing their entries."""

    actions = ["clear_entries"]
    list_display = [
        "name",
        "version",
        "registered",
        "local_hits",
        "redis_hits",
        "misses",
        "computations",
        "hit_rate",
        "compute_saved",
    ]
    list_filter = ["registered"]
    search_fields = ["name"]
    fields = ["name", "version", "registered", "created_at", "updated_at"]
    readonly_fields = fields

    def get_changelist(self, request, **kwargs) -> type[ChangeList]:
        return MemoizedFunctionChangeList

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        # The change permission grants the clear action on the list; a function's own page stays read-only.
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="local hits")
    def local_hits(self, function: MemoizedFunction) -> int:
        return _stats(function).local_hits

    @admin.display(description="Redis hits")
    def redis_hits(self, function: MemoizedFunction) -> int:
        return _stats(function).redis_hits

    @admin.display(description="misses")
    def misses(self, function: MemoizedFunction) -> int:
        return _stats(function).misses

    @admin.display(description="computations")
    def computations(self, function: MemoizedFunction) -> int:
        return _stats(function).computations

    @admin.display(description="hit %")
    def hit_rate(self, function: MemoizedFunction) -> str | None:
        rate = _stats(function).hit_rate
        return None if rate is None else f"{rate * 100:.1f}"

    @admin.display(description="compute saved (s)")
    def compute_saved(self, function: MemoizedFunction) -> str:
        return f"{_stats(function).saved_ms / 1000:.3f}"

    @admin.action(description="Clear memoized entries", permissions=["change"])
    def clear_entries(self, request, queryset) -> None:
        # By name, like fn.clear(): the web process need not have imported the code that declares them.
        removed = sum(memo_clear(function.name) for function in queryset)
        self.message_user(
            request, f"Removed {removed} memoized entr{pluralize(removed, 'y,ies')} of {queryset.count()} function(s)."
        )
