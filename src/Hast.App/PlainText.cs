using System.Text;

namespace Hast.App;

/// A TextWriter that drops terminal escape sequences (CSI `ESC [ … final`, OSC `ESC ] … BEL/ST`, and
/// two-character `ESC x`) from what it passes on, for logs that are read as plain text (CI, pipes).
public sealed class PlainText(TextWriter inner) : TextWriter
{
    enum State { Text, Esc, Csi, Osc, OscEsc }
    State state;

    public override Encoding Encoding => inner.Encoding;

    public override void Write(char c)
    {
        switch (state)
        {
            case State.Text:
                if (c == '\u001b') state = State.Esc;
                else inner.Write(c);
                break;
            case State.Esc:
                state = c switch { '[' => State.Csi, ']' => State.Osc, _ => State.Text };
                break;
            case State.Csi:
                if (c >= '@' && c <= '~') state = State.Text; // the final byte
                break;
            case State.Osc:
                if (c == '\u0007') state = State.Text;
                else if (c == '\u001b') state = State.OscEsc;
                break;
            case State.OscEsc:
                state = c == '\\' ? State.Text : State.Osc;
                break;
        }
    }

    public override void Write(string? value)
    {
        if (value is null) return;
        if (state == State.Text && !value.Contains('\u001b')) { inner.Write(value); return; }
        foreach (var c in value) Write(c);
    }

    public override void Write(char[] buffer, int index, int count)
    {
        for (var i = index; i < index + count; i++) Write(buffer[i]);
    }

    public override void Flush() => inner.Flush();
}
