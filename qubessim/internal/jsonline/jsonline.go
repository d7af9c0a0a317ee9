// Package jsonline is the framing both of the simulator's internal protocols use (its
// control socket and the simulated kernel's socket): one JSON request line, one JSON
// answer line, one connection per request.
package jsonline

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
)

// MaxLine bounds a request: a kernel request carries a key, a control request a fault
// description; neither comes near it.
const MaxLine = 1 << 20

// Call sends req to the Unix socket at path and decodes the answer line into resp.
// peer names the other side in errors.
func Call(path, peer string, req, resp any) error {
	c, err := net.Dial("unix", path)
	if err != nil {
		return fmt.Errorf("cannot reach the %s: %w", peer, err)
	}
	defer c.Close()
	if err := Write(c, req); err != nil {
		return fmt.Errorf("cannot send to the %s: %w", peer, err)
	}
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("%s closed the connection: %w", peer, err)
	}
	if err := json.Unmarshal(line, resp); err != nil {
		return fmt.Errorf("cannot read the %s's answer: %w", peer, err)
	}
	return nil
}

// Read reads one line from c into v.
func Read(c io.Reader, v any) error {
	line, err := bufio.NewReaderSize(c, MaxLine).ReadBytes('\n')
	if err != nil {
		return err
	}
	return json.Unmarshal(line, v)
}

// Write writes v as one line.
func Write(c io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = c.Write(append(b, '\n'))
	return err
}
