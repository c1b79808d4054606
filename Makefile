# ksmtuned: install from a checkout without a package manager, and build the packages.
#
#   make install [DESTDIR=/stage] [PREFIX=/usr/local]   everything: code, commands, units, config,
#                                                       libvirt hook, logrotate, man, completion
#   make uninstall [DESTDIR=...] [PREFIX=...]           remove exactly that again (a config file
#                                                       you changed is kept, as dpkg and rpm do)
#   make man          regenerate man/man5/ksmtuned.conf.5's key table and check every page renders
#   make completion   regenerate completion/ from the argument parsers
#   make deb          the Debian package, with dpkg-buildpackage (in ..)
#   make rpm          the noarch RPM, with rpmbuild (in build/rpm)
#   make sdist        the source tarball (dist/)
#
# The Python package goes to a private directory ($(pkglibdir)) that the two commands put first
# on sys.path: no pip, no site-packages of a particular Python version, nothing for PEP 668 to
# refuse. Its dependencies come from the distribution: python3-sdnotify, python3-pydantic,
# python3-psutil (python3-prometheus-client for metrics).
# Debian's `ksmtuned` package installs the same units and config files: remove it first
# (apt remove ksmtuned) or, better, install ours as a package (make deb).

PREFIX ?= /usr/local
prefix ?= $(PREFIX)
sbindir ?= $(prefix)/sbin
libdir ?= $(prefix)/lib
pkglibdir ?= $(libdir)/ksmtuned
datadir ?= $(prefix)/share
mandir ?= $(datadir)/man
docdir ?= $(datadir)/doc/ksmtuned
completiondir ?= $(datadir)/bash-completion/completions
sysconfdir ?= /etc
# Debian's home of KSM_MAX_KERNEL_PAGES; Red Hat's is $(sysconfdir)/sysconfig (ksmctl reads both)
defaultsdir ?= $(sysconfdir)/default
unitdir ?= $(prefix)/lib/systemd/system
# RHEL's service(8) runs legacy-actions/ksmtuned/retune for `service ksmtuned retune` under systemd
legacyactiondir ?= /usr/libexec/initscripts/legacy-actions
PYTHON ?= /usr/bin/python3
# On Debian, rpm's database knows none of the BuildRequires (they are Fedora's package names)
RPMBUILD_OPTS ?= $(if $(wildcard /etc/debian_version),--nodeps)

INSTALL ?= install
SHELL := /bin/bash
# Debian's own tools, not pyenv's or a virtualenv's python3 first on PATH
DEBIAN_PATH := /usr/bin:/bin:/usr/sbin:/sbin

VERSION := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml)
PYFILES := $(shell find ksmtuned -name '*.py' -not -path '*/__pycache__/*' | LC_ALL=C sort)
MAN8 := man/man8/ksmtuned.8 man/man8/ksmctl.8
MAN5 := man/man5/ksmtuned.conf.5
COMPLETIONS := $(wildcard completion/*)
DOCS := README.md LICENSE $(wildcard docs/*.md) contrib/prometheus/ksmtuned.rules.yml
UNITS := systemd/ksm.service systemd/ksmtuned.service
# The SysV init scripts, for hosts without systemd (installed when the checkout has them)
INITSCRIPTS := $(wildcard etc/init.d/*)
LEGACY := $(wildcard etc/legacy-actions/ksmtuned/retune)
HOOK := etc/libvirt/hooks/qemu.d/ksmtuned
CONFIGS := $(sysconfdir)/ksmtuned.conf:etc/ksmtuned.conf $(defaultsdir)/ksm:etc/default/ksm \
	$(sysconfdir)/logrotate.d/ksmtuned:etc/logrotate.d/ksmtuned $(sysconfdir)/libvirt/hooks/qemu.d/ksmtuned:$(HOOK)

.PHONY: all install uninstall man completion deb rpm sdist check-man clean

all:
	@echo "nothing to build: make install, make deb, make rpm (see the Makefile's head)"

define wrapper
#!$(PYTHON)
# $(1): installed by ksmtuned's Makefile; the package lives in $(pkglibdir).
import sys
sys.path.insert(0, "$(pkglibdir)")
from ksmtuned.cli import $(2)
sys.exit($(2)())
endef
export ksmtuned_wrapper = $(call wrapper,ksmtuned,main)
export ksmctl_wrapper = $(call wrapper,ksmctl,ksmctl_main)

install:
	@set -e; for f in $(PYFILES); do \
		$(INSTALL) -D -m 0644 "$$f" "$(DESTDIR)$(pkglibdir)/$$f"; \
	done
	$(INSTALL) -d "$(DESTDIR)$(sbindir)"
	printf '%s\n' "$$ksmtuned_wrapper" >"$(DESTDIR)$(sbindir)/ksmtuned"
	printf '%s\n' "$$ksmctl_wrapper" >"$(DESTDIR)$(sbindir)/ksmctl"
	chmod 0755 "$(DESTDIR)$(sbindir)/ksmtuned" "$(DESTDIR)$(sbindir)/ksmctl"
	@# the units name /usr/sbin: point them at $(sbindir)
	$(INSTALL) -d "$(DESTDIR)$(unitdir)"
	@set -e; for u in $(UNITS); do \
		sed 's|/usr/sbin/|$(sbindir)/|g' "$$u" >"$(DESTDIR)$(unitdir)/$${u##*/}"; \
		chmod 0644 "$(DESTDIR)$(unitdir)/$${u##*/}"; \
	done
	@# the init scripts too
	@set -e; for i in $(INITSCRIPTS); do \
		$(INSTALL) -d "$(DESTDIR)$(sysconfdir)/init.d"; \
		sed 's|/usr/sbin/|$(sbindir)/|g' "$$i" >"$(DESTDIR)$(sysconfdir)/init.d/$${i##*/}"; \
		chmod 0755 "$(DESTDIR)$(sysconfdir)/init.d/$${i##*/}"; \
	done
	$(if $(LEGACY),$(INSTALL) -d "$(DESTDIR)$(legacyactiondir)/ksmtuned")
	$(if $(LEGACY),sed 's|/usr/sbin/|$(sbindir)/|g' $(LEGACY) >"$(DESTDIR)$(legacyactiondir)/ksmtuned/retune")
	$(if $(LEGACY),chmod 0755 "$(DESTDIR)$(legacyactiondir)/ksmtuned/retune")
	@# configuration: never overwrite what is there (it may be the admin's)
	@set -e; for pair in $(CONFIGS); do \
		dest="$(DESTDIR)$${pair%%:*}" src="$${pair#*:}"; \
		mode=0644; [ -x "$$src" ] && mode=0755; \
		if [ -e "$$dest" ]; then echo "kept $$dest (exists)"; \
		else $(INSTALL) -D -m $$mode "$$src" "$$dest"; fi; \
	done
	$(INSTALL) -D -m 0644 -t "$(DESTDIR)$(mandir)/man8" $(MAN8)
	$(INSTALL) -D -m 0644 -t "$(DESTDIR)$(mandir)/man5" $(MAN5)
	$(if $(COMPLETIONS),$(INSTALL) -D -m 0644 -t "$(DESTDIR)$(completiondir)" $(COMPLETIONS))
	$(INSTALL) -D -m 0644 -t "$(DESTDIR)$(docdir)" $(DOCS)

uninstall:
	rm -rf "$(DESTDIR)$(pkglibdir)/ksmtuned"
	-rmdir "$(DESTDIR)$(pkglibdir)"
	rm -f "$(DESTDIR)$(sbindir)/ksmtuned" "$(DESTDIR)$(sbindir)/ksmctl"
	rm -f $(foreach u,$(UNITS),"$(DESTDIR)$(unitdir)/$(notdir $(u))")
	rm -f $(foreach i,$(INITSCRIPTS),"$(DESTDIR)$(sysconfdir)/init.d/$(notdir $(i))")
	rm -f "$(DESTDIR)$(legacyactiondir)/ksmtuned/retune"
	-rmdir "$(DESTDIR)$(legacyactiondir)/ksmtuned" 2>/dev/null
	@# a configuration file is removed only when it is still the shipped one
	@set -e; for pair in $(CONFIGS); do \
		dest="$(DESTDIR)$${pair%%:*}" src="$${pair#*:}"; \
		if cmp -s "$$src" "$$dest"; then rm -f "$$dest"; \
		elif [ -e "$$dest" ]; then echo "kept $$dest (changed)"; fi; \
	done
	rm -f $(foreach m,$(MAN8),"$(DESTDIR)$(mandir)/man8/$(notdir $(m))")
	rm -f $(foreach m,$(MAN5),"$(DESTDIR)$(mandir)/man5/$(notdir $(m))")
	rm -f $(foreach c,$(COMPLETIONS),"$(DESTDIR)$(completiondir)/$(notdir $(c))")
	rm -rf "$(DESTDIR)$(docdir)"
	@# a staging tree (DESTDIR) is left without the empty directories install made in it
	@if [ -n "$(DESTDIR)" ] && [ -d "$(DESTDIR)" ]; then find "$(DESTDIR)" -depth -type d -empty -delete; fi

man:
	$(PYTHON) tools/gen-man.py
	$(MAKE) check-man

check-man:
	@set -e; for m in $(MAN8) $(MAN5); do \
		out=$$(LC_ALL=C.UTF-8 groff -man -ww -z "$$m" 2>&1); \
		if [ -n "$$out" ]; then echo "$$m: $$out" >&2; exit 1; fi; \
	done; echo "man pages render without a warning"

completion:
	$(PYTHON) tools/gen-completion.py

sdist:
	$(PYTHON) -m build --sdist --outdir dist .

deb:
	PATH=$(DEBIAN_PATH) dpkg-buildpackage -us -uc -b

rpm:
	rm -rf build/rpm
	mkdir -p build/rpm/SOURCES
	@# the checkout as it is (committed or not), without what .gitignore leaves out
	git ls-files -z --cached --others --exclude-standard | \
		tar --null -T - --ignore-failed-read --transform 's,^,ksmtuned-$(VERSION)/,' \
		-czf build/rpm/SOURCES/ksmtuned-$(VERSION).tar.gz
	PATH=$(DEBIAN_PATH) rpmbuild -bb $(RPMBUILD_OPTS) --define "_topdir $(CURDIR)/build/rpm" packaging/rpm/ksmtuned.spec

clean:
	rm -rf build dist *.egg-info
