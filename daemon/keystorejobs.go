package daemon

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/systemd"
)

// readyKeystore unlocks the store luks-init adds keys to, or creates it when there is
// none, as the original's luks-init --keystore did.
func (r *jobRun) readyKeystore(ctx context.Context, k chains.Keystore) error {
	st, err := r.d.engine.KeystoreStatus(ctx, k)
	switch {
	case err != nil:
		return err
	case !st.Exists:
		return r.createKeystore(ctx, k)
	case st.Unlocked:
		return nil
	}
	_, err = r.unlock(ctx, k, st)
	return err
}

// keystoreUnlock unlocks a key store: without a password when it is open already (an
// earlier unlock this boot, or the original), else with the one an agent gives (the
// caller may answer its own question).
func (r *jobRun) keystoreUnlock(ctx context.Context) (outcome, error) {
	k := chains.Keystore{Dir: r.j.keystore}
	st, err := r.d.engine.KeystoreStatus(ctx, k)
	switch {
	case err != nil:
		return outcome{}, err
	case !st.Exists:
		return outcome{}, fmt.Errorf("cannot unlock %s: %w", k.Dir, chains.ErrKeystoreMissing)
	case st.Unlocked:
		return outcome{message: "unlocked already"}, nil
	}
	msg, err := r.unlock(ctx, k, st)
	return outcome{message: msg}, err
}

// unlock unlocks an existing, locked store: without a password when it is open
// already, else with the one an agent gives.
func (r *jobRun) unlock(ctx context.Context, k chains.Keystore, st chains.KeystoreState) (string, error) {
	if st.Open {
		if err := r.d.engine.KeystoreUnlock(ctx, k, nil); err != nil {
			return "", err
		}
		return "unlocked (it was open already: no password needed)", nil
	}
	password, err := r.askPassword(ctx, "Password for the qcrypt key store "+k.Dir)
	if err != nil {
		return "", fmt.Errorf("cannot unlock %s: %w", k.Dir, err)
	}
	defer clear(password)
	if err := r.d.engine.KeystoreUnlock(ctx, k, password); err != nil {
		return "", err
	}
	return "unlocked", nil
}

// keystoreInit creates a store, as blib does, with a password an agent gives.
func (r *jobRun) keystoreInit(ctx context.Context) (outcome, error) {
	k := chains.Keystore{Dir: r.j.keystore}
	st, err := r.d.engine.KeystoreStatus(ctx, k)
	if err != nil {
		return outcome{}, err
	}
	if st.Exists {
		return outcome{}, fmt.Errorf("cannot create a key store in %s: %w", k.Dir, chains.ErrKeystoreExists)
	}
	if err := r.createKeystore(ctx, k); err != nil {
		return outcome{}, err
	}
	return outcome{message: "created and unlocked"}, nil
}

// createKeystore creates a store with a new password an agent gives.
func (r *jobRun) createKeystore(ctx context.Context, k chains.Keystore) error {
	password, err := r.askPassword(ctx, "New password for the qcrypt key store "+k.Dir)
	if err != nil {
		return fmt.Errorf("cannot create %s: %w", k.Dir, err)
	}
	defer clear(password)
	return r.d.engine.KeystoreInit(ctx, k, password)
}

// askPassword asks systemd's password agents; besides root, the user who started the
// job may answer its question (qcryptctl answers its own).
func (r *jobRun) askPassword(ctx context.Context, message string) ([]byte, error) {
	answerer := int(r.j.uid)
	if r.j.uid == 0 {
		answerer = -1 // root answers anyway
	}
	return systemd.Ask(ctx, systemd.Question{Dir: r.d.o.AskPasswordDir, Message: message, Icon: "dialog-password",
		ID: dbusapi.PasswordQuestionID(r.j.id), Timeout: keystorePasswordWait, AnswerUID: answerer})
}

// keystorePasswordWait is how long an unlock waits for a password.
const keystorePasswordWait = 5 * time.Minute

// keystoreUnlocked lets the chains that wait for the store open.
func (d *Daemon) keystoreUnlocked(dir string) {
	for _, name := range d.sortedNames() {
		cs := d.chains[name]
		if (cs.state == dbusapi.ChainWaiting || cs.state == dbusapi.ChainFailed) && slices.Contains(cs.c.KeystoreDirs(), dir) {
			d.consider(cs, dbusapi.Because(dbusapi.CauseKeystoreOpened, "key store "+dir+" unlocked"), mayOpen)
		}
	}
}
