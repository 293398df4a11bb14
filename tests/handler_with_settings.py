"""A handler module outside glb that declares its own settings (section [tests.handler_with_settings])."""

from glb.config import Choice, Int, Setting

SETTINGS = (
    Setting("tests.handler_with_settings", "greeting", Choice("hello", "hi"), "hello", "What to answer."),
    Setting("tests.handler_with_settings", "times", Int(min=1, max=3), "1", "How often."),
)


def configure(section):
    return Greeter(section.greeting, section.times)


class Greeter:
    def __init__(self, greeting, times):
        self.greeting, self.times = greeting, times

    def on_message(self, event):
        for _ in range(self.times):
            event.connection.send(self.greeting)
        event.handled = True
