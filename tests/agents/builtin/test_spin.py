from agents.builtin.spin import SpinInput, spin


def test_spin_burns_the_requested_cpu_time():
    result = spin(None, SpinInput(ms=30))

    assert result["cpu_ms"] >= 30
    assert result["spins"] > 0
