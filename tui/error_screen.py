"""The modal shown when the source or the bundle fails: why, and what to do next."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Label, Static


class ErrorScreen(ModalScreen[str]):
    """The source or the bundle failed: say why, offer retry (and the demo video), or quit.

    Dismisses with "retry", "demo" or "quit". It has its own footer: the main screen's
    (pause, snapshot, ...) would otherwise show through, and none of those keys work here.
    """

    BINDINGS = [
        Binding("r", "choose('retry')", "Retry"),
        Binding("d", "choose('demo')", "Demo video"),
        Binding("q,escape", "choose('quit')", "Quit", key_display="q"),
    ]

    def __init__(self, title: str, text: str, offer_demo: bool) -> None:
        super().__init__()
        self._title, self._text, self._offer_demo = title, text, offer_demo

    def compose(self) -> ComposeResult:
        with Vertical(id="error-box") as box:
            box.border_title = self._title
            yield Static(self._text, id="error-text", markup=False)
            if self._offer_demo:
                yield Label("No camera here? Play the demo video instead.", id="error-hint")
            with Horizontal(id="error-buttons"):
                yield Button("Retry (r)", id="retry", variant="primary")
                if self._offer_demo:
                    yield Button("Demo video (d)", id="demo", variant="success")
                yield Button("Quit (q)", id="quit", variant="error")
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "choose" and parameters == ("demo",) and not self._offer_demo:
            return False  # hidden from the footer, and the key does nothing
        return True

    def action_choose(self, choice: str) -> None:
        if choice == "demo" and not self._offer_demo:
            return
        self.dismiss(choice)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(str(event.button.id))
